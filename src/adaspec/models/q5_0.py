"""Linear layers that compute with a GGUF file's own Q5_0 weights (part of `--quant q4k`).

Why: a Q4_K_M file stores a tensor whose input size is no multiple of 256 as Q5_0 instead of Q4_K.
In the 0.5B drafter (hidden size 896) that is every `attn_q`, `attn_k`, `attn_output`, `ffn_gate`
and `ffn_up` and half the `attn_v` layers: 173 MB of its 398 MB of linear layers. Until session 12
q4k ran them as int8 with one scale per output channel: 8 bits read per weight where the file has
5.5, and re-quantised values. Here they compute with the file's own 5-bit values.

The format (ggml's block_q5_0): a block of 32 inputs holds 5-bit values q in [0, 32) (the low 4
bits in `qs`, the fifth bits in a 32-bit `qh`) and one fp16 factor d:

    W[n, 32 b + i] = d * (q - 16)

`unpack_q5_0` maps the GGUF bytes onto (q, d) without re-quantising; `dequantize` gives the float32
weights exactly as the gguf package does (one product each), so they equal the float model
converted from the file bit for bit (tested).

The kernel (kernels/q5_0.cpp, in the same extension as the Q4_K and Q6_K kernels) quantises the
activations to int8 per row and per block of 32 (the Q4_K kernel's blocks of 256 do not divide
896), sums each block's integer products exactly (AVX-512 VNNI `vpdpbusd` on the unsigned 5-bit
values), subtracts 16 times the activations' block sum and adds the block in float with one fma per
output. A row's result depends on that row alone, so a k-row forward is bit-identical to k one-row
forwards, and the portable loop gives the same results on CPUs without AVX-512 VNNI. Stored: the
low nibbles in the Q4_K kernel's tiles, the fifth bits in a plane of 1 bit per weight and d as the
file's fp16 (5.5 bits a weight, as the file).
"""

from __future__ import annotations

import numpy as np
import torch

from adaspec.models.extension import BlockLinear, kernel, nibble_tiles, tile_nibbles

QB = 32  # inputs per block
BLOCK_BYTES = 22  # ggml block_q5_0: d (fp16), qh (4 bytes), qs[16]
PARTS = ("w4", "wh", "d")


def unpack_q5_0(raw: np.ndarray) -> dict[str, torch.Tensor]:
    """GGUF Q5_0 rows (N, K/32 * 22) uint8 -> q (N, K) uint8 (the 5-bit values in input order) and
    d (N, K/32) float16 (the file's factors)."""
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % BLOCK_BYTES:
        raise ValueError(f"Q5_0 rows must be (N, K/32 * {BLOCK_BYTES}) uint8, got {raw.shape} {raw.dtype}")
    n, nb = raw.shape[0], raw.shape[1] // BLOCK_BYTES
    blocks = raw.reshape(n, nb, BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    qh = blocks[..., 2:6].copy().view("<u4")[..., 0]  # bit i: the fifth bit of input i
    qs = blocks[..., 6:]  # byte i: input i in its low nibble, input 16 + i in its high nibble
    low = np.concatenate([qs & 15, qs >> 4], axis=-1)
    high = ((qh[..., None] >> np.arange(QB, dtype=np.uint32)) & 1).astype(np.uint8)
    q = (low | (high << 4)).reshape(n, nb * QB)
    return {"q": torch.from_numpy(np.ascontiguousarray(q)), "d": torch.from_numpy(np.ascontiguousarray(d))}


def dequantize(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weights (N, K) that `unpack_q5_0`'s tensors stand for."""
    n, k = w["q"].shape
    q = (w["q"].to(torch.int8) - 16).to(torch.float32).reshape(n, k // QB, QB)
    return (w["d"].to(torch.float32)[..., None] * q).reshape(n, k)


def pack_tiles(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kernel's layout (kernels/q5_0.cpp): low nibbles as the Q4_K kernel's tiles, the fifth bits
    of each block's 32 inputs in 64 bytes per tile, the factors grouped by 16 outputs."""
    q = w["q"]
    n, k = q.shape
    if n % 16 or k % QB:
        raise ValueError(f"Q5_0 tiles need a multiple of 16 outputs and of 32 inputs, got {n} x {k}")
    high = (q >> 4).reshape(n // 16, 16, k // QB, 4, 2, 4)  # (tile, o, b, group, half, i)
    high = high.permute(0, 2, 1, 5, 3, 4).reshape(n // 16, k // QB, 16, 4, 8)  # (tile, b, o, i, 2 group + half)
    wh = (high << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    d = w["d"].reshape(n // 16, 16, k // QB).transpose(1, 2).contiguous()
    return {"w4": nibble_tiles(q & 15), "wh": wh.reshape(n // 16, k // QB, 64).contiguous(), "d": d}


def unpack_tiles(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`pack_tiles` undone: q and d as `unpack_q5_0` gives them."""
    tiles, groups = packed["w4"].shape[:2]
    n, k = tiles * 16, groups * 8
    h = packed["wh"].reshape(tiles, k // QB, 16, 4)  # (tile, b, o, i)
    high = torch.stack([(h >> bit) & 1 for bit in range(8)], dim=-1)  # (tile, b, o, i, 2 group + half)
    high = high.reshape(tiles, k // QB, 16, 4, 4, 2).permute(0, 2, 1, 4, 5, 3).reshape(n, k)
    return {"q": tile_nibbles(packed["w4"]) | (high << 4), "d": packed["d"].transpose(1, 2).reshape(n, k // QB)}


class Q50Linear(BlockLinear):
    """y = x W^T (+ bias) with W held as Q5_0; x (..., K) float32 -> (..., N) float32."""

    kind = "q5_0"
    parts = PARTS
    act_block = QB
    unpack_tiles, dequantize = staticmethod(unpack_tiles), staticmethod(dequantize)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        return kernel().linear_q5_0(rows, self.w4, self.wh, self.d, self.kernel_name)
