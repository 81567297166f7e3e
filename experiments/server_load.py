"""Throughput and time to first token of `adaspec serve`, with 1..N concurrent clients.

    adaspec serve --threads 2 &          # loopback only
    python experiments/server_load.py --clients 1 4 --requests 4 --max-tokens 64
    # or start the server(s) itself, one after another, and compare them in one run:
    python experiments/server_load.py --clients 1 2 4 8 --serve "--threads 2 --max-batch 1" \
        --serve "--threads 2 --max-batch 8"

Each client sends streamed chat completions one after another; the script prints, per concurrency
level, the aggregate throughput (completion tokens of all requests / wall time), the mean
per-client rate (a request's tokens / its latency), the time to first token (p50, p95) and the
mean request latency. Requests are bounded in number and time and go to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

MODEL = ["default"]  # replaced by the server's own model id at start
PROMPTS = ["Write a Python function that checks whether a number is prime.",
           "Explain what a hash map is in two sentences.",
           "Write a SQL query that counts orders per customer.",
           "Translate to English: Der Hund schläft im Garten."]


def one_request(url: str, prompt: str, max_tokens: int, key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": MODEL[0], "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True}
    t0 = time.perf_counter()
    ttft, usage = None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": usage["completion_tokens"]}


def level(url: str, clients: int, requests: int, max_tokens: int, key: str | None) -> dict:
    results, lock = [], threading.Lock()

    def client(c: int) -> None:
        for i in range(requests):
            r = one_request(url, PROMPTS[(c + i) % len(PROMPTS)], max_tokens, key)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"clients": clients, "requests": len(results), "wall_s": wall,
            "throughput_tok_s": sum(r["tokens"] for r in results) / wall,
            "per_client_tok_s": statistics.mean(r["tokens"] / r["latency"] for r in results),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": _quantile(ttfts, 0.95),
            "latency_mean_s": statistics.mean(r["latency"] for r in results)}


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def serve(args: str) -> tuple[subprocess.Popen, str]:
    """Start `adaspec serve ARGS` on a free loopback port; wait until it answers /health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "adaspec.cli", "serve", *shlex.split(args), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {shlex.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit("the server did not start within 600 s")


def run_levels(url: str, a, label: str) -> None:
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    MODEL[0] = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
    level(url, 1, 1, 8, a.api_key)  # warm-up, discarded
    for c in a.clients:
        r = level(url, c, a.requests, a.max_tokens, a.api_key)
        print(f"| {label} | {c} | {r['requests']} | {r['throughput_tok_s']:.1f} | {r['per_client_tok_s']:.1f} | "
              f"{r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {r['latency_mean_s']:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--serve", action="append", default=None, metavar="ARGS",
                    help="start `adaspec serve ARGS` itself (repeatable: each is run in turn) instead of --url")
    a = ap.parse_args()
    print("| server | clients | requests | aggregate tok/s | per-client tok/s | TTFT p50 s | TTFT p95 s | latency mean s |")
    print("|---|---|---|---|---|---|---|---|")
    for args in a.serve or [None]:
        if args is None:
            run_levels(a.url, a, a.url)
            continue
        proc, url = serve(args)
        try:
            run_levels(url, a, args)
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
