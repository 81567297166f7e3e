"""Throughput and time to first token of a running `adaspec serve`, with 1..N concurrent clients.

    adaspec serve --quant int8 --threads 2 &          # loopback only
    python experiments/server_load.py --clients 1 4 --requests 4 --max-tokens 64

Each client sends streamed chat completions one after another; the script prints, per concurrency
level, the time to first token (median, max), the mean request latency and the aggregate
throughput (completion tokens of all requests / wall time). Requests are bounded in number and
time and go to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
            "ttft_median_s": statistics.median(ttfts), "ttft_max_s": max(ttfts),
            "latency_mean_s": statistics.mean(r["latency"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key", default=None)
    a = ap.parse_args()
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    MODEL[0] = httpx.get(f"{a.url}/v1/models", headers=headers).json()["data"][0]["id"]
    level(a.url, 1, 1, 8, a.api_key)  # warm-up, discarded
    print("| clients | requests | throughput tok/s | TTFT median s | TTFT max s | latency mean s |")
    print("|---|---|---|---|---|---|")
    for c in a.clients:
        r = level(a.url, c, a.requests, a.max_tokens, a.api_key)
        print(f"| {c} | {r['requests']} | {r['throughput_tok_s']:.1f} | {r['ttft_median_s']:.2f} | "
              f"{r['ttft_max_s']:.2f} | {r['latency_mean_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
