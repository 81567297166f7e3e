"""torch.profiler over one-token steps of an int8 model on adaspec's fast runtime (exact rows).

    python experiments/fast_profile.py qwen2.5-coder-0.5b --steps 10

Prints the operator table (self CPU time) of `--steps` one-token forwards after a 200-token
context, each rolled back, and the median ms of 20 unprofiled steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from adaspec.models.fast import FastDecoder
from adaspec.models.quant import quantize_adapter
from adaspec.models.registry import load_pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="qwen2.5-coder-0.5b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=25, help="operator rows to print")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    hf, tok = load_pretrained(a.model)
    quantize_adapter(hf, "int8")
    fast = FastDecoder(hf.model, a.model)
    ids = torch.tensor(tok.encode('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n' * 12))[:200]
    fast.extend(ids)

    def step() -> None:
        base = fast.length
        fast.extend(ids[:1])
        fast.rollback(base)

    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"one-token step: median {1e3 * statistics.median(times):.1f} ms")


if __name__ == "__main__":
    main()
