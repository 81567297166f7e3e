"""What the kernels for a GGUF file's own quantised blocks share (models/q4k.py for Q4_K,
models/q6k.py for Q6_K, models/q5_0.py for Q5_0): the compiled C++ extension (kernels/), which
holds all three, and the tiles of 4-bit values they all lay their weights out in."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import torch

QK = 256  # inputs per super-block of Q4_K and Q6_K
# How the kernels take their activations (BlockLinear.acts):
# - "a8": rounded to int8 per row and block of 256 inputs (32 for Q5_0), as llama.cpp's Q8_K;
# - "a16": each row as two int8 rows, the row and what its rounding left out (x - d q), each rounded
#   per block; the kernel's two results are added. About 15 bits of precision for twice the rows.
ACTS = ("a8", "a16")


@cache
def kernel():
    """The compiled extension (built once per machine into torch's extension cache)."""
    from torch.utils.cpp_extension import load

    folder = Path(__file__).with_name("kernels")
    files = sorted(folder.glob("*.cpp")) + sorted(folder.glob("*.h"))
    # named by the files' contents: torch's loader rebuilds when a source changes but not when only a
    # header does (acts.h), so a changed header gets another name, never a stale build
    digest = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:10]
    # -fopenmp: at::parallel_for is inline OpenMP in the extension's own code; without the flag it runs
    # on one thread. The OpenMP runtime is the one torch has already loaded (the same libgomp.so.1).
    return load(name=f"adaspec_kernels_{digest}", sources=[str(f) for f in files if f.suffix == ".cpp"],
                extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def nibble_tiles(q: torch.Tensor) -> torch.Tensor:
    """4-bit values (N, K) uint8 -> tiles (N/16, K/8, 64) of 16 outputs x 8 inputs, byte 4o + i holding
    input i of output o in its low nibble and input 4 + i in its high nibble."""
    n, k = q.shape
    if n % 16 or k % 8:
        raise ValueError(f"tiles need a multiple of 16 outputs and 8 inputs, got {n} x {k}")
    t = q.reshape(n // 16, 16, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # (tile, g, o, i, half)
    return (t[..., 0] | (t[..., 1] << 4)).reshape(n // 16, k // 8, 64).contiguous()


def tile_nibbles(w4: torch.Tensor) -> torch.Tensor:
    """`nibble_tiles` undone: tiles (T, K/8, 64) -> the 4-bit values (16 T, K) uint8."""
    tiles, groups = w4.shape[:2]
    t = w4.reshape(tiles, groups, 16, 4)
    q = torch.stack([t & 15, t >> 4], dim=3)  # (tile, g, o, half, i)
    return q.permute(0, 2, 1, 3, 4).reshape(tiles * 16, groups * 8)


class BlockLinear(torch.nn.Module):
    """y = x W^T (+ bias) with W held in a kernel's packed tiles (`parts`, in that order: a model's
    fingerprint reads them); x (..., K) float32 -> (..., N) float32. Subclasses name their kind
    (what a packed copy records, models/packed.py) and parts, and call their kernel (`_rows`)."""

    kind: str = ""
    parts: tuple[str, ...] = ()
    act_block: int = QK  # inputs per activation block of the kernel's int8 rounding

    def __init__(self, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None, *,
                 kernel_name: str = "auto"):
        """packed: the kernel's tensors of one matrix (its format's `pack_tiles`)."""
        super().__init__()
        self.out_features = packed["w4"].shape[0] * 16
        self.in_features = packed["w4"].shape[1] * 8
        for name in self.parts:
            self.register_buffer(name, packed[name])
        self.bias = bias
        self.kernel_name = kernel_name
        self.acts = "a8"  # the activations' form: ACTS

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None, *,
                    kernel_name: str = "auto") -> "BlockLinear":
        return cls(packed, bias, kernel_name=kernel_name)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # A format whose packed tiles can be read back (its `unpack_tiles` and `dequantize`) gives single
    # weight rows: a draft head shares the target's output head this way (models/features.py).
    unpack_tiles = None
    dequantize = None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The float32 weights of outputs `ids` (n, K): the file's values, de-quantised."""
        if self.unpack_tiles is None:
            raise NotImplementedError(f"{type(self).__name__} gives no single weight rows")
        ids = ids.reshape(-1).to(torch.long)
        out = torch.empty(ids.numel(), self.in_features)
        for start in range(0, ids.numel(), 256):  # in slices, and only the rows asked for de-quantised
            part_ids = ids[start : start + 256]
            tiles, where = torch.unique(part_ids // 16, return_inverse=True)
            part = type(self).unpack_tiles({name: getattr(self, name)[tiles] for name in self.parts})
            rows = where * 16 + part_ids % 16  # every unpacked tensor has one row per output
            out[start : start + part_ids.numel()] = type(self).dequantize({k: t[rows] for k, t in part.items()})
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        if self.acts == "a16":  # each row and its rounding's remainder, two kernel rows added
            out = self._rows(kernel().split_activations(rows, self.act_block, self.kernel_name))
            out = out[0::2] + out[1::2]
        else:
            out = self._rows(rows)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"acts={self.acts}")


def set_activations(model: torch.nn.Module, acts: str) -> int:
    """Give every block layer of `model` (and the fused layers made of them) the activation form
    `acts` (ACTS); the number of layers set. Results stay independent of the other rows in either
    form, so a k-row forward still equals k one-row forwards."""
    if acts not in ACTS:
        raise ValueError(f"unknown activation form {acts!r}; choose one of {', '.join(ACTS)}")
    count = 0
    for m in model.modules():
        if isinstance(m, BlockLinear):
            m.acts = acts
            count += 1
            fused = getattr(m, "fused", None)
            if fused is not None:
                fused[1].acts = acts
    return count
