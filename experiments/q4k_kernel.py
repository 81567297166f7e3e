"""The Q4_K kernel against fbgemm's int8 on the same matrices: one matrix held in cache, and 56
matrices (every ffn_gate and ffn_up of the 1.5B, larger than any cache) streamed from memory.

    python experiments/q4k_kernel.py --model qwen2.5-coder-1.5b --threads 2

The int8 layers are built from the very Q4_K weights (dequantised), so both compute the same
matrices. Each figure is the median of --repeats timings, the two kernels interleaved. Run it alone.
docs/runtime.md reports it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from adaspec.calibration.identity import machine_name
from adaspec.models import q4k
from adaspec.models.quant import Int8Linear
from adaspec.models.registry import path


def timed(mods, x) -> float:
    t0 = time.perf_counter()
    for m in mods:
        m(x)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    from gguf import GGUFReader

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 5, 8, 16])
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tensors = {t.name: t for t in GGUFReader(str(path(a.model))).tensors}
    names = sorted((n for n in tensors if n.endswith(("ffn_gate.weight", "ffn_up.weight"))),
                   key=lambda n: (int(n.split(".")[1]), n))
    fast, int8 = [], []
    for name in names:
        w = q4k.unpack_q4k(np.asarray(tensors[name].data))
        fast.append(q4k.Q4KLinear(w))
        dense = torch.nn.Linear(fast[-1].in_features, fast[-1].out_features, bias=False)
        dense.weight.data = q4k.dequantize(w)
        int8.append(Int8Linear.from_float(dense))
    q4_mb = sum(b.numel() * b.element_size() for m in fast for b in m.buffers()) / 1e6
    i8_mb = sum(m.in_features * m.out_features for m in int8) / 1e6
    shape = f"{fast[0].out_features}x{fast[0].in_features}"
    print(f"# Q4_K kernel and fbgemm int8, {a.model}, {a.threads} threads, {machine_name()}, "
          f"AVX-512 VNNI kernel: {q4k.kernel().has_vnni()}\n")
    print(f"| rows | one {shape} matrix in cache: Q4_K ms | int8 ms | {len(names)} matrices streamed "
          f"({q4_mb:.0f} MB Q4_K, {i8_mb:.0f} MB int8): Q4_K ms | int8 ms |\n|---|---|---|---|---|")
    for rows in a.rows:
        x = torch.randn(rows, fast[0].in_features)
        cols = []
        for group in ((fast[:1], int8[:1]), (fast, int8)):
            ours, theirs = [], []
            timed(group[0], x), timed(group[1], x)
            for _ in range(a.repeats):
                ours.append(timed(group[0], x))
                theirs.append(timed(group[1], x))
            cols += [statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3]
        print(f"| {rows} | " + " | ".join(f"{c:.3f}" if i < 2 else f"{c:.1f}" for i, c in enumerate(cols)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
