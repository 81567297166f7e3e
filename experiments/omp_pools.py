"""One target forward over 8 rows on the thread that loaded the model, on another thread, and on
another thread once the loading thread's OpenMP pool is released (adaspec/models/openmp.py).

    python experiments/omp_pools.py --threads 2

Loads the default pair, prefills eight copies of one prompt, then times (median of 12) a forward
of one new token for each of the eight sequences, rolled back after each: on the main thread,
on a new thread, on a new thread after `release_pool()` on the main thread, and on the main
thread again. The figures in docs/server.md ("Threads") come from this script.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

import adaspec
from adaspec.models.fast import SlotView
from adaspec.models.openmp import release_pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    engine = adaspec.load()
    target = engine.target
    views = [SlotView(target) for _ in range(a.rows)]
    ids = torch.tensor(engine.encode("Write a Python function that checks whether a number is prime."))
    target.extend_batch([v.slot for v in views], [ids] * a.rows, logits=[False] * a.rows)
    length = views[0].slot.length

    def bench(label: str) -> None:
        times = []
        for _ in range(12):
            t0 = time.perf_counter()
            target.extend_batch([v.slot for v in views], [ids[:1]] * a.rows)
            times.append((time.perf_counter() - t0) * 1e3)
            for v in views:
                v.slot.length = length
        print(f"{label}: {statistics.median(times):.1f} ms per forward of {a.rows} rows", flush=True)

    def on_thread(label: str) -> None:
        t = threading.Thread(target=bench, args=(label,))
        t.start()
        t.join()

    bench("loading (main) thread")
    on_thread("another thread")
    print("release_pool() on the main thread:", release_pool())
    on_thread("another thread, the main thread's pool released")
    bench("main thread again")


if __name__ == "__main__":
    main()
