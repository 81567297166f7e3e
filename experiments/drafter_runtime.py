"""One model, three runtimes, forwards interleaved: what a drafted token costs on each.

    python experiments/drafter_runtime.py qwen2.5-coder-0.5b --reps 30

Loads the model in int8 and times one forward over 1 and 5 new tokens after a 200-token context,
rolled back after each, alternating between transformers' forward (`hf`), adaspec's runtime with
exact rows (`fast`, fused int8 projections) and the drafter form (`dyn`, fused and one dynamic
quantisation range per forward). Prints the median and minimum ms of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adaspec.models.fast import FastDecoder
from adaspec.models.quant import quantize_adapter
from adaspec.models.registry import load_pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="qwen2.5-coder-0.5b")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    hf, tok = load_pretrained(a.model)
    quantize_adapter(hf, "int8")
    runtimes = {"hf": hf, "fast": FastDecoder(hf.model, a.model), "dyn": FastDecoder(hf.model, a.model, exact_rows=False)}
    ids = torch.tensor(tok.encode('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n' * 12))[:200]
    for adapter in runtimes.values():
        adapter.extend(ids)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(a.reps):
        for n in (1, 5):
            for name, adapter in runtimes.items():
                base = adapter.length
                t0 = time.perf_counter()
                adapter.extend(ids[:n])
                times.setdefault((name, n), []).append(time.perf_counter() - t0)
                adapter.rollback(base)
    for (name, n), ts in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{name:5s} {n} new tokens: median {1e3 * statistics.median(ts):.1f} ms, min {1e3 * min(ts):.1f} ms")


if __name__ == "__main__":
    main()
