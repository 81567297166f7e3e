"""Linear layers that compute with a GGUF file's own Q4_K weights (`--quant q4k`; docs/runtime.md
has the measurements).

Why: decoding on a CPU reads every weight once per forward, so bytes per weight set the floor of a
step. ggml's Q4_K stores 256 weights in 144 bytes (4.5 bits each); the int8 path reads 8 bits per
weight and re-quantises the published 4-bit model, which costs agreement with it.

The format (ggml's block_q4_K, its 12 packed scale bytes unpacked to one byte per scale and min):
a super-block of 256 inputs holds 8 sub-blocks j of 32 weights with 4-bit values q, 6-bit scales
sc_j and mins m_j, and two fp16 super-block factors d and dmin:

    W[n, 256 b + 32 j + i] = d * sc_j * q - dmin * m_j

`unpack_q4k` maps the GGUF bytes onto (qs, sc, mn, d, dm) without re-quantising anything: the
dequantised weights are exactly ggml's (tests compare with the gguf package's dequantiser).

The kernel (kernels/q4k.cpp, built on first use with the machine's C++ compiler and OpenMP):
activations are quantised to int8 per row and per 256-block (symmetric, round to nearest even);
per block, the sub-blocks' integer dot products (AVX-512 VNNI `vpdpbusd`: unsigned 4-bit weights
times signed int8 activations) times their scales, and the mins times the activations' sub-block
sums, are exact int32 sums; two fmas per output and block add them in float in a fixed order. A
row's result depends on that row alone and is computed by the same instructions however many rows
a forward holds, so a k-row forward is bit-identical to k one-row forwards: the property lossless
speculation rests on. CPUs without AVX-512 VNNI run a portable loop that gives the same results.

The file's Q6_K layers (the output head, half of `attn_v` and `ffn_down` in a Q4_K_M file) and Q5_0
layers (those whose input size is no multiple of 256, as in the 0.5B) have kernels of their own in
the same extension (models/q6k.py, models/q5_0.py); `apply_gguf` places all three.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from adaspec.config import AdaspecError
from adaspec.models.extension import QK, BlockLinear, kernel, nibble_tiles
from adaspec.models import q5_0, q6k

BLOCK_BYTES = 144  # ggml block_q4_K: d, dmin (fp16), scales[12], qs[128]


@cache
def vectorised_here() -> bool:
    """Whether this CPU runs the vectorised kernel (AVX-512 with VNNI), read from the CPU's flags
    without building the kernel; elsewhere the portable loop is exact but far slower than fbgemm's
    int8, so `--quant auto` picks int8 there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= set(flags)


def unpack_q4k(raw: np.ndarray) -> dict[str, torch.Tensor]:
    """GGUF Q4_K rows (N, K/256 * 144) uint8 -> the kernel's tensors qs (N, K/2) uint8, sc and mn
    (N, K/32) uint8, d and dm (N, K/256) float32."""
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % BLOCK_BYTES:
        raise ValueError(f"Q4_K rows must be (N, K/256 * {BLOCK_BYTES}) uint8, got {raw.shape} {raw.dtype}")
    n, nb = raw.shape[0], raw.shape[1] // BLOCK_BYTES
    blocks = raw.reshape(n, nb, BLOCK_BYTES)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dm = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    s = blocks[:, :, 4:16].astype(np.uint8)  # (n, nb, 12): ggml's get_scale_min_k4
    sc = np.empty((n, nb, 8), np.uint8)
    mn = np.empty((n, nb, 8), np.uint8)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = np.ascontiguousarray(blocks[:, :, 16:]).reshape(n, nb * 128)
    return {"qs": torch.from_numpy(qs), "sc": torch.from_numpy(sc.reshape(n, nb * 8)),
            "mn": torch.from_numpy(mn.reshape(n, nb * 8)), "d": torch.from_numpy(d), "dm": torch.from_numpy(dm)}


def dequantize(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weights (N, K) that `unpack_q4k`'s tensors stand for."""
    n, nb = w["d"].shape
    q = values(w["qs"]).reshape(n, nb, 8, 32).to(torch.float32)  # (n, nb, j, i)
    scale = w["d"][..., None] * w["sc"].reshape(n, nb, 8).to(torch.float32)  # (n, nb, j)
    low = w["dm"][..., None] * w["mn"].reshape(n, nb, 8).to(torch.float32)
    return (scale[..., None] * q - low[..., None]).reshape(n, nb * QK)


def values(qs: torch.Tensor) -> torch.Tensor:
    """ggml-ordered nibbles (N, K/2) -> the 4-bit values (N, K) uint8 in input order."""
    n = qs.shape[0]
    blocks = qs.reshape(n, -1, 4, 32)  # (n, nb, p, l): low nibble element 64p + l, high 64p + 32 + l
    return torch.stack([blocks & 15, blocks >> 4], dim=3).reshape(n, -1)


def pack_tiles(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kernel's layout (kernels/q4k.cpp): tiles of 16 outputs x 8 inputs in 64 bytes, byte 4o + i
    holding inputs i (low nibble) and 4 + i (high nibble) of output o, and every scale grouped by
    16 outputs. N must be a multiple of 16."""
    q = values(w["qs"])
    n, k = q.shape
    w4 = nibble_tiles(q)

    def by16(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(n // 16, 16, -1).transpose(1, 2).contiguous()

    # mins: per tile and 256-block, pairs of sub-blocks (2p, 2p + 1) side by side per output
    mn = w["mn"].reshape(n // 16, 16, k // QK, 4, 2).permute(0, 2, 3, 1, 4).reshape(n // 16, k // QK, 128)
    return {"w4": w4, "sc": by16(w["sc"]), "mn": mn.contiguous(), "d": by16(w["d"]), "dm": by16(w["dm"])}


class Q4KLinear(BlockLinear):
    """y = x W^T (+ bias) with W held as Q4_K; x (..., K) float32 -> (..., N) float32."""

    kind = "q4k"
    parts = ("w4", "sc", "mn", "d", "dm")

    def __init__(self, weights: dict[str, torch.Tensor] | None, bias: torch.Tensor | None = None, *,
                 kernel_name: str = "auto", packed: dict[str, torch.Tensor] | None = None):
        """weights: `unpack_q4k`'s tensors of one matrix (or packed: `pack_tiles`' of one already)."""
        super().__init__(pack_tiles(weights) if packed is None else packed, bias, kernel_name=kernel_name)

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None, *,
                    kernel_name: str = "auto") -> "Q4KLinear":
        return cls(None, bias, kernel_name=kernel_name, packed=packed)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        return kernel().linear(rows, self.w4, self.sc, self.mn, self.d, self.dm, self.kernel_name)


def fuse_blocks(linears: list[BlockLinear]) -> BlockLinear:
    """One layer of the same kind (Q4_K, Q6_K or Q5_0) computing several that read the same input
    (q, k, v; gate, up), their outputs side by side: tiles of 16 outputs are independent, so each
    output is bit-identical to its own layer's, and a forward makes one kernel call (one pass over
    the activations, one thread fork) instead of several."""
    kinds = {type(m) for m in linears}
    if (len(kinds) != 1 or len({m.in_features for m in linears}) != 1 or len({m.kernel_name for m in linears}) != 1
            or len({m.acts for m in linears}) != 1):
        raise ValueError("fused block layers must be of one kind and read the same input with the same kernel "
                         "and activation form")
    cls = kinds.pop()
    done = getattr(linears[0], "fused", None)  # a second runtime over the same model (batched serving)
    if done is not None and done[0] == [id(m) for m in linears]:
        return done[1]
    packed = {name: torch.cat([getattr(m, name) for m in linears]) for name in cls.parts}
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in linears])
    start = 0  # each layer keeps working, on its slice of the fused weights (no second copy in memory)
    for m in linears:
        tiles = m.out_features // 16
        for name, t in packed.items():
            setattr(m, name, t[start:start + tiles])
        start += tiles
    fused = cls.from_packed(packed, bias, kernel_name=linears[0].kernel_name)
    fused.acts = linears[0].acts
    linears[0].fused = ([id(m) for m in linears], fused)
    return fused


# GGUF tensor names of a Llama-family block -> the transformers module that holds that weight
GGUF_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


PACK_VERSION = 4  # the kernels' layouts (pack_tiles, q6k/q5_0.pack_tiles; 3: Q6_K layers too, 4: Q5_0); another is another folder
PACKED_FILE = "q4k.safetensors"
# the layers a packed copy may hold, by the kind it records (models/packed.py)
BLOCK_LAYERS: dict[str, type[BlockLinear]] = {cls.kind: cls for cls in (Q4KLinear, q6k.Q6KLinear, q5_0.Q50Linear)}


@dataclass(frozen=True)
class PackCache:
    """Where the packed Q4_K layers of one GGUF file are kept for `apply_gguf` on a float model (the
    q4k path with a pruned drafting vocabulary; a plain q4k load keeps the whole model packed instead,
    models/packed.py): `root/q4k-<sha256[:12]>-v<version>/`,
    keyed by the file's checksum and the layout version, stamped like the converted float copy
    (models/convert_cache.py) and refused when damaged, with `fix` saying how to rebuild it."""
    root: Path
    sha256: str
    fix: str

    @property
    def folder(self) -> Path:
        return Path(self.root) / f"q4k-{self.sha256[:12]}-v{PACK_VERSION}"


def apply_gguf(model: torch.nn.Module, gguf_path: str | Path, cache: PackCache | None = None) -> list[str]:
    """Replace every linear layer of `model` whose GGUF weight is Q4_K by a Q4KLinear, every one
    whose weight is Q6_K (the output head included) by a Q6KLinear (models/q6k.py) and every Q5_0 one
    by a Q50Linear (models/q5_0.py), on those very bytes; returns the names replaced. Each replaced weight must equal the model's float weight (the
    model was converted from the same file), so a file that does not belong to the model is refused.

    cache: keep the packed layers on disk, so that later loads read them (about 1 s) instead of
    parsing the GGUF, checking every layer against the float weights and packing again (about
    15 s for the 1.5B). A damaged copy is refused (one line naming the fix), never loaded."""
    from adaspec.models import convert_cache as cc

    if cache is not None and cc.is_complete(cache.folder):
        why = cc.damaged(cache.folder)
        if why is not None:
            raise AdaspecError(f"the packed Q4_K copy {cache.folder} is damaged ({why}); {cache.fix}")
        return _apply_packed(model, cache.folder)
    packed = _from_gguf(model, gguf_path)
    if cache is not None:
        _save_packed(packed, cache, Path(gguf_path).name)
    return list(packed)


def module_for(tensor_name: str) -> str | None:
    """The transformers module holding a GGUF tensor's weight (None for tensors that are no linear
    layer's): blk.N.<kind>.weight -> model.layers.N.<module>, output.weight -> lm_head."""
    if tensor_name == "output.weight":
        return "lm_head"
    parts = tensor_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_LINEARS and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{GGUF_LINEARS[parts[2]]}"
    return None


def _from_gguf(model: torch.nn.Module, gguf_path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    from gguf import GGMLQuantizationType, GGUFReader

    formats = {GGMLQuantizationType.Q4_K: (unpack_q4k, dequantize, pack_tiles),
               GGMLQuantizationType.Q6_K: (q6k.unpack_q6k, q6k.dequantize, q6k.pack_tiles),
               GGMLQuantizationType.Q5_0: (q5_0.unpack_q5_0, q5_0.dequantize, q5_0.pack_tiles)}
    packed = {}
    modules = dict(model.named_modules())
    for t in GGUFReader(str(gguf_path)).tensors:
        name = module_for(t.name)
        if name is None or t.tensor_type not in formats:
            continue
        unpack, dequant, pack = formats[t.tensor_type]
        linear = modules.get(name)
        if type(linear) is not torch.nn.Linear:
            raise AdaspecError(f"{gguf_path}: tensor {t.name} has no linear layer {name} in this model")
        if name == "lm_head" and linear.weight.shape[0] != int(t.shape[-1]):
            continue  # a head cut to a drafting vocabulary (api.cut_output_head): its rows are int8
        w = unpack(np.asarray(t.data))
        weight = dequant(w)
        if tuple(linear.weight.shape) != tuple(weight.shape) or not torch.equal(weight, linear.weight.detach()):
            raise AdaspecError(f"{gguf_path}: tensor {t.name} does not hold the weights of {name}; load the model "
                               "from this GGUF file")
        del weight
        packed[name] = pack(w)
        _replace(modules, name, packed[name])
    return packed


def _replace(modules: dict, name: str, packed: dict[str, torch.Tensor]) -> None:
    """Swap the float layer `name` for the block layer of these packed tensors (its kind told by the
    parts they hold)."""
    linear = modules[name]
    bias = None if linear.bias is None else linear.bias.detach().clone()
    parent, _, child = name.rpartition(".")
    cls = next(c for c in BLOCK_LAYERS.values() if set(c.parts) == set(packed))
    setattr(modules[parent], child, cls.from_packed(packed, bias))


def _apply_packed(model: torch.nn.Module, folder: Path) -> list[str]:
    from safetensors.torch import load_file

    layers: dict[str, dict[str, torch.Tensor]] = {}  # layer name -> its packed tensors by part
    for key, t in load_file(str(folder / PACKED_FILE)).items():
        name, _, part = key.rpartition(".")
        layers.setdefault(name, {})[part] = t
    names = sorted(layers)
    modules = dict(model.named_modules())
    for name in names:
        linear = modules.get(name)
        packed = layers[name]
        if type(linear) is not torch.nn.Linear or "w4" not in packed or tuple(linear.weight.shape) != (
                packed["w4"].shape[0] * 16, packed["w4"].shape[1] * 8):
            raise AdaspecError(f"the packed Q4_K copy {folder} does not fit this model (layer {name}); load the "
                               "model from the GGUF file it was packed from")
        _replace(modules, name, packed)
    return names


def _save_packed(packed: dict[str, dict[str, torch.Tensor]], cache: PackCache, gguf_name: str) -> None:
    """Write the folder (convert_cache.publish: under a temporary name, marker last, then renamed). A
    cache that cannot be written only costs the next load its speed: that is logged, not raised."""
    import logging

    from safetensors.torch import save_file

    from adaspec.models import convert_cache as cc

    def write(tmp: Path) -> None:
        save_file({f"{name}.{part}": t.contiguous() for name, parts in packed.items() for part, t in parts.items()},
                  str(tmp / PACKED_FILE))
        (tmp / cc.MARKER).write_text(json.dumps({"gguf": gguf_name, "sha256": cache.sha256, "format": "q4k",
                                                 "version": PACK_VERSION, "files": cc._stamp(tmp)}, indent=1))

    try:
        cc.publish(cache.root, cache.folder, write)
    except OSError as e:
        logging.getLogger("adaspec").warning("could not keep the packed Q4_K layers in %s (%s); the next load "
                                             "packs them again", cache.root, e.strerror or e)


def drop_damaged(root: Path, sha256: str) -> list[Path]:
    """Delete every damaged packed copy of the GGUF with this checksum under `root` (the next q4k load
    packs it again); returns the folders deleted."""
    from adaspec.models import convert_cache as cc

    return cc.drop_damaged(root, f"q4k-{sha256[:12]}-v*")
