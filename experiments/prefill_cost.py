"""What a prefill costs with and without logits for every prompt position, interleaved.

    python experiments/prefill_cost.py

Loads the default int8 pair and, for prompts of 100, 500 and 1000 random token ids, times each
model's prefill through `extend` (logits at every position, as before adaspec's `absorb`) and
through `models.base.absorb` (the output head on the last position only), three times each,
alternating; prints the medians.
"""

from __future__ import annotations

import statistics
import time

import torch

import adaspec
from adaspec.models.base import absorb


def main() -> None:
    torch.set_num_threads(2)
    engine = adaspec.load(quant="int8")
    for n in (100, 500, 1000):
        ids = torch.randint(0, 150000, (n,))
        for name, adapter in (("target", engine.target), ("drafter", engine.drafter)):
            times: dict[str, list[float]] = {}
            for _ in range(3):
                for label, fill in (("extend", adapter.extend), ("absorb", lambda x, a=adapter: absorb(a, x))):
                    adapter.reset()
                    t0 = time.perf_counter()
                    fill(ids)
                    times.setdefault(label, []).append(time.perf_counter() - t0)
            print(f"{n} tokens {name}: extend {1e3 * statistics.median(times['extend']):.0f} ms, "
                  f"absorb {1e3 * statistics.median(times['absorb']):.0f} ms")


if __name__ == "__main__":
    main()
