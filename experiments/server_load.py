"""Throughput and time to first token of `adaspec serve` (and of llama.cpp's llama-server on the same
GGUF file) with 1..N concurrent clients, or a bounded soak run with cancellations.

    adaspec serve --threads 2 &          # loopback only
    python experiments/server_load.py --clients 1 4 --requests 4 --max-tokens 64
    # or start the servers itself, one after another, and compare them in one run:
    python experiments/server_load.py --clients 1 2 4 8 --serve "--threads 2 --max-batch 1" \
        --serve "--threads 2 --max-batch 8" \
        --llama-server "-m GGUF -t 2 -tb 2 -np 8 -c 8192" --llama-server-bin PATH/llama-server
    # five minutes of 8 clients, every 4th request abandoned by its client:
    python experiments/server_load.py --soak 300 --clients 8 --cancel-every 4 --serve "--threads 2"

The load itself, what is measured and how each request's fate is counted: adaspec/bench/load.py.
Servers started here listen on 127.0.0.1 only. The soak run exits 1 when a request was lost, got a
5xx or an unexpected 4xx, or the server did not fall idle afterwards.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import socket
import subprocess
import sys
import time

import httpx

from adaspec.bench import load


def start(cmd: list[str], port: int) -> tuple[subprocess.Popen, str]:
    """Run a server command; wait (at most 600 s) until its /health answers 200."""
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adaspec_cmd(args: str, port: int) -> list[str]:
    return [sys.executable, "-m", "adaspec.cli", "serve", *shlex.split(args), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning"]


def llama_cmd(binary: str, args: str, port: int) -> list[str]:
    return [binary, *shlex.split(args), "--host", "127.0.0.1", "--port", str(port)]


def run_levels(server: load.Server, a, label: str) -> None:
    extra = {"ignore_eos": True} if a.ignore_eos else None
    load.level(server, 1, 1, 8, extra=extra)  # warm-up, discarded
    for c in a.clients:
        r = load.level(server, c, a.requests, a.max_tokens, extra=extra)
        print(f"| {label} | {c} | {r['requests']} | {r['throughput_tok_s']:.1f} | {r['per_client_tok_s']:.1f} | "
              f"{r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {r['latency_mean_s']:.2f} |", flush=True)


def run_soak(server: load.Server, a, label: str) -> bool:
    before = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    r = load.soak(server, a.clients[0], a.soak, a.max_tokens, cancel_every=a.cancel_every,
                  abandon_after_s=a.abandon_after, extra={"ignore_eos": True} if a.ignore_eos else None)
    after = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    print(f"| {label} | {a.clients[0]} | {r.seconds:.0f} | {r.sent} | " + " | ".join(
        str(r.outcomes[o]) for o in load.OUTCOMES) + f" | {r.tokens / r.seconds:.1f} | {r.idle_after} |", flush=True)
    for line in r.problems[:20]:
        print("   ", line)
    print(metric_delta(before, after), flush=True)
    return r.ok


def metric_delta(before: str, after: str) -> str:
    """The server's own request and generation counters over the run (adaspec's /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    def counts(text: str) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name in ("adaspec_requests_total", "adaspec_generations_total")}
    b, a = counts(before), counts(after)
    lines = [f"    {name}{dict(labels)} +{a[(name, labels)] - b.get((name, labels), 0):g}"
             for name, labels in sorted(a) if a[(name, labels)] != b.get((name, labels), 0)]
    return "\n".join(lines) if lines else "    (no adaspec counters)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--ignore-eos", action="store_true",
                    help="every answer runs to --max-tokens (both servers honour ignore_eos): equal work per request")
    ap.add_argument("--serve", action="append", default=[], metavar="ARGS",
                    help="start `adaspec serve ARGS` itself (repeatable: each is run in turn) instead of --url")
    ap.add_argument("--llama-server", action="append", default=[], metavar="ARGS",
                    help="start llama.cpp's server with ARGS (repeatable), e.g. \"-m FILE.gguf -t 2 -np 8 -c 8192\"")
    ap.add_argument("--llama-server-bin", default="llama-server", help="the llama-server executable")
    ap.add_argument("--soak", type=float, default=0, metavar="SECONDS",
                    help="instead of the levels: a bounded load run of this many seconds with the first --clients "
                         "count, requests back to back, streamed and not in turn, some abandoned")
    ap.add_argument("--cancel-every", type=int, default=4, help="soak: every Nth request of a client is abandoned")
    ap.add_argument("--abandon-after", type=float, default=1.0,
                    help="soak: seconds an abandoned non-streamed request waits before its client leaves")
    a = ap.parse_args()
    runs = [(f"adaspec serve {s}", adaspec_cmd, s) for s in a.serve]
    if a.llama_server:
        binary = shutil.which(a.llama_server_bin)
        if binary is None:
            raise SystemExit(f"no llama-server executable at {a.llama_server_bin!r}: build llama.cpp's server "
                             "(docs/server.md) and pass --llama-server-bin")
        runs += [(f"llama-server {s}", lambda args, port, b=binary: llama_cmd(b, args, port), s)
                 for s in a.llama_server]
    if a.soak:
        print("| server | clients | seconds | requests | " + " | ".join(load.OUTCOMES)
              + " | completed tok/s | idle after |")
        print("|---" * (6 + len(load.OUTCOMES)) + "|")
    else:
        print("| server | clients | requests | aggregate tok/s | per-client tok/s | TTFT p50 s | TTFT p95 s | "
              "latency mean s |")
        print("|---|---|---|---|---|---|---|---|")
    ok = True
    for label, make, args in runs or [(a.url, None, None)]:
        proc = None
        if make is None:
            url = a.url
        else:
            port = free_port()
            proc, url = start(make(args, port), port)
        try:
            server = load.Server.at(url, a.api_key)
            if a.soak:
                ok = run_soak(server, a, label) and ok
            else:
                run_levels(server, a, label)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
