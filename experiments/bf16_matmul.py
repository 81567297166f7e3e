"""Would bfloat16 matrix units (oneDNN through torch: AMX on Intel Xeons that have it, AVX512-BF16
elsewhere) speed up the work that has many rows per forward: a prompt's prefill, and the batched
decoding that makes a draft head's training answers? A measurement before anything is built.

    python experiments/bf16_matmul.py

Three parts, 2 threads, nothing else should run:
1. one 1536 x 8960 matrix (the 1.5B's MLP shape) in float32 and bfloat16, for 1, 64 and 512 rows;
2. the default target's prefill (`absorb`) of 64, 300 and 900 tokens of README.md: its own kernels,
   then every quantised linear layer replaced, for forwards of at least 64 rows, by a bfloat16
   matmul on a de-quantised bfloat16 copy of its weights, kept in memory (read back through the
   layer itself, so it is the layer's own weights; building the copies is not timed);
3. batched greedy decoding (`extend_batch`, 16 / 64 / 128 sequences after 128-token prompts, 8
   steps) with the kernels, then with the bfloat16 copies for forwards of at least 16 rows.
docs/runtime.md reports what it printed. The copies hold 2.6 GB beside the packed weights, so this
measures a ceiling (a kernel that de-quantises on the fly would add its own time), not a design.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import adaspec
from adaspec.models.extension import BlockLinear
from adaspec.models.quant import Int8Linear

ROOT = Path(__file__).resolve().parents[1]


def matmul_rates() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(8960, 1536, dtype=dtype)
        for rows in (1, 64, 512):
            x = torch.randn(rows, 1536, dtype=dtype)
            for _ in range(3):
                torch.nn.functional.linear(x, w)
            t = time.perf_counter()
            for _ in range(10):
                torch.nn.functional.linear(x, w)
            s = (time.perf_counter() - t) / 10
            print(f"{str(dtype):15} {rows:>4} rows: {s * 1e3:6.2f} ms, {2 * rows * 1536 * 8960 / s / 1e9:5.0f} GFLOP/s")


class Bf16Copies:
    """Quantised linear layers run forwards of at least `min_rows` rows as bfloat16 matmuls."""

    def __init__(self):
        self.min_rows = None
        self.copies: dict[int, torch.Tensor] = {}
        self.originals = {cls: cls.forward for cls in (BlockLinear, Int8Linear)}
        for cls, original in self.originals.items():
            cls.forward = self._forward(original)

    def weight(self, layer, original) -> torch.Tensor:
        if id(layer) not in self.copies:  # W^T read back through the layer: its rows for unit inputs
            eye = torch.eye(layer.in_features)
            with torch.inference_mode():
                wt = torch.cat([original(layer, eye[i : i + 512]) for i in range(0, layer.in_features, 512)])
            if getattr(layer, "bias", None) is not None:
                wt = wt - layer.bias
            self.copies[id(layer)] = wt.t().contiguous().to(torch.bfloat16)
        return self.copies[id(layer)]

    def _forward(self, original):
        copies = self

        def forward(layer, x):
            if copies.min_rows is None or x.reshape(-1, x.shape[-1]).shape[0] < copies.min_rows:
                return original(layer, x)
            out = torch.nn.functional.linear(x.to(torch.bfloat16), copies.weight(layer, original)).float()
            return out + layer.bias if getattr(layer, "bias", None) is not None else out

        return forward


def prefill_s(target, ids: torch.Tensor, n: int) -> float:
    best = float("inf")
    for _ in range(2):
        target.reset()
        t = time.perf_counter()
        target.absorb(ids[:n])
        best = min(best, time.perf_counter() - t)
    return best


def decode_rate(target, ids: torch.Tensor, batch: int, steps: int = 8, prompt: int = 128) -> float:
    slots = [target.new_slot() for _ in range(batch)]
    for j, slot in enumerate(slots):
        target.extend_batch([slot], [ids[j * 7 : j * 7 + prompt]], logits=[False])
    nxt = [ids[:1]] * batch
    t = time.perf_counter()
    for _ in range(steps):
        nxt = [out[-1:].argmax(-1) for out in target.extend_batch(slots, nxt)]
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    torch.set_num_threads(2)
    matmul_rates()
    engine = adaspec.load()
    target = engine.target
    ids = torch.tensor(engine.encode((ROOT / "README.md").read_text(), chat=False))
    copies = Bf16Copies()
    for label, min_rows in (("kernels", None), ("bf16 copies", 64)):
        copies.min_rows = min_rows
        if min_rows is not None:
            t = time.perf_counter()
            target.reset()
            target.absorb(ids[:64])  # builds the copies
            print(f"bf16 copies built in {time.perf_counter() - t:.0f} s, "
                  f"{sum(w.numel() * 2 for w in copies.copies.values()) / 1e9:.2f} GB")
        for n in (64, 300, 900):
            s = prefill_s(target, ids, n)
            print(f"prefill, {label:11}: {n:>4} tokens {s:5.2f} s, {n / s:4.0f} tok/s")
    for label, min_rows in (("kernels", None), ("bf16 copies", 16)):
        copies.min_rows = min_rows
        decode_rate(target, ids, 16, steps=1)  # builds the output head's copy, which a prefill skips
        for batch in (16, 64, 128):
            print(f"batched decoding, {label:11}: {batch:>3} sequences, {decode_rate(target, ids, batch):4.0f} tok/s")


if __name__ == "__main__":
    main()
