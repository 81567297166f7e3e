"""Linear layers that compute with a GGUF file's own Q6_K weights (part of `--quant q4k`).

Why: a Q4_K_M file keeps its most sensitive tensors at 6 bits: the output head and half of the
`attn_v` and `ffn_down` layers (354 of the 1.5B's 1,111 MB). Until session 11, q4k ran them as
int8 with one scale per output channel: re-quantised weights, 8 bits read per weight, and the
largest part of q4k's disagreement with the published model (docs/runtime.md, "Where the
disagreement with float32 comes from": the int8 head alone cost 7.6 points of greedy agreement).
Here they compute with the file's own 6-bit values.

The format (ggml's block_q6_K): a super-block of 256 inputs holds 16 sub-blocks s of 16 weights
with values q in [0, 64) (4 low bits in `ql`, 2 high bits in `qh`), a signed 8-bit scale sc_s per
sub-block and one fp16 factor d:

    W[n, 256 b + 16 s + i] = d * sc_s * (q - 32)

`unpack_q6k` maps the GGUF bytes onto (q, sc, d) without re-quantising; `dequantize` gives the
float32 weights in the gguf package's own order of operations ((d * sc) * (q - 32)), so they equal
the float model converted from the file bit for bit (tested).

The kernel (kernels/q6k.cpp, in the same extension as the Q4_K kernel) quantises activations as the
Q4_K kernel does (int8 per row and per 256-block), sums each sub-block's integer products exactly
(AVX-512 VNNI `vpdpbusd` on the unsigned 6-bit values), subtracts 32 times the activations'
sub-block sum, multiplies by the signed scale and adds the sub-blocks in int32; one fma per output
and block adds the block in float. So, as for Q4_K, a row's result depends on that row alone and a
k-row forward is bit-identical to k one-row forwards; the portable loop gives the same results on
CPUs without AVX-512 VNNI. Stored: the low nibbles in the Q4_K kernel's tiles and the high bits in a
second plane of 2 bits per weight (6 bits a weight, 6.6 with the scales; the file's 6.56).
"""

from __future__ import annotations

import numpy as np
import torch

from adaspec.models.extension import QK, BlockLinear, kernel, nibble_tiles, tile_nibbles

BLOCK_BYTES = 210  # ggml block_q6_K: ql[128], qh[64], scales[16] (int8), d (fp16)
PARTS = ("w4", "w2", "sc", "d")


def unpack_q6k(raw: np.ndarray) -> dict[str, torch.Tensor]:
    """GGUF Q6_K rows (N, K/256 * 210) uint8 -> q (N, K) uint8 (the 6-bit values in input order),
    sc (N, K/16) int8 and d (N, K/256) float32."""
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % BLOCK_BYTES:
        raise ValueError(f"Q6_K rows must be (N, K/256 * {BLOCK_BYTES}) uint8, got {raw.shape} {raw.dtype}")
    n, nb = raw.shape[0], raw.shape[1] // BLOCK_BYTES
    blocks = raw.reshape(n, nb, BLOCK_BYTES)
    # each half of a block (128 inputs): ql's 64 bytes give inputs 0-63 (low nibbles) and 64-127 (high
    # nibbles); qh's 32 bytes give the two high bits of inputs l, 32 + l, 64 + l, 96 + l (bits 0-1 .. 6-7)
    ql = blocks[..., :128].reshape(n, nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    q = (ql & 15).reshape(n, nb * QK) | ((qh & 3).reshape(n, nb * QK) << 4)
    sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).reshape(n, nb * 16)
    d = blocks[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float32)
    return {"q": torch.from_numpy(np.ascontiguousarray(q)), "sc": torch.from_numpy(sc.copy()),
            "d": torch.from_numpy(d)}


def dequantize(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weights (N, K) that `unpack_q6k`'s tensors stand for."""
    n, k = w["q"].shape
    scale = w["d"].repeat_interleave(16, dim=1) * w["sc"].to(torch.float32)  # (n, K/16): d * sc
    q = (w["q"].to(torch.int8) - 32).to(torch.float32).reshape(n, k // 16, 16)
    return (scale[..., None] * q).reshape(n, k)


def pack_tiles(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kernel's layout (kernels/q6k.cpp): low nibbles as the Q4_K kernel's tiles, the high two
    bits of each sub-block's 16 inputs in 64 bytes per tile, scales grouped by 16 outputs."""
    q = w["q"]
    n, k = q.shape
    if n % 16 or k % QK:
        raise ValueError(f"Q6_K tiles need a multiple of 16 outputs and of 256 inputs, got {n} x {k}")
    high = (q >> 4).reshape(n // 16, 16, k // 16, 2, 2, 4)  # (tile, o, s, group, half, i)
    high = high.permute(0, 2, 1, 5, 3, 4).reshape(n // 16, k // 16, 16, 4, 4)  # (tile, s, o, i, 2 group + half)
    w2 = (high[..., 0] | (high[..., 1] << 2) | (high[..., 2] << 4) | (high[..., 3] << 6)).reshape(n // 16, k // 16, 64)

    def by16(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(n // 16, 16, -1).transpose(1, 2).contiguous()

    return {"w4": nibble_tiles(q & 15), "w2": w2.contiguous(), "sc": by16(w["sc"]), "d": by16(w["d"])}


def unpack_tiles(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`pack_tiles` undone (for the tiles given): q, sc and d as `unpack_q6k` gives them."""
    tiles, groups = packed["w4"].shape[:2]
    n, k = tiles * 16, groups * 8
    h = packed["w2"].reshape(tiles, k // 16, 16, 4)  # (tile, s, o, i)
    high = torch.stack([(h >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)  # (tile, s, o, i, 2 group + half)
    high = high.reshape(tiles, k // 16, 16, 4, 2, 2).permute(0, 2, 1, 4, 5, 3).reshape(n, k)

    def from16(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(n, -1)

    return {"q": tile_nibbles(packed["w4"]) | (high << 4), "sc": from16(packed["sc"]), "d": from16(packed["d"])}


class Q6KLinear(BlockLinear):
    """y = x W^T (+ bias) with W held as Q6_K; x (..., K) float32 -> (..., N) float32."""

    kind = "q6k"
    parts = PARTS
    unpack_tiles, dequantize = staticmethod(unpack_tiles), staticmethod(dequantize)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        return kernel().linear_q6k(rows, self.w4, self.w2, self.sc, self.d, self.kernel_name)
