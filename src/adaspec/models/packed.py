"""A q4k model kept on disk as it runs: packed Q4_K layers, int8 layers, the GGUF's own embedding rows.

Why: a q4k load used to read the float32 copy of the whole model (6.7 GB for the 1.5B, made by
models/convert_cache.py), quantise it and keep parts of it: the float32 token embedding (933 MB
for the 1.5B, 545 MB for the 0.5B) and, through the memory-mapped float file that the embedding
and the norms still pointed into, most of that file's pages. The default pair held 6.9 GB
resident for 1.6 GB of GGUF files. Here the load reads only what is run:

- every Q4_K linear layer as the kernel's packed tiles (models/q4k.py), bias apart;
- every Q6_K linear layer, the output head included, as its kernel's packed tiles (models/q6k.py;
  since session 11, version 2 of the folder);
- every Q5_0 linear layer as its kernel's packed tiles (models/q5_0.py; since session 12, version 3);
- every other linear layer (Q8_0 in the file) as int8 with per-channel scales and
  its row sums (models/quant.py's `Int8Linear`: the same integers, scales and row sums as
  quantising the float layer, so the same outputs bit for bit);
- the token embedding as the GGUF's own quantised rows (`GGUFEmbedding`), de-quantised per
  lookup with the gguf package, which is what made the float copy: the same float32 rows;
- norms, biases and the rotary frequencies as they are.

The folder `<root>/run-q4k-<sha256[:12]>-v<VERSION>/` holds `model.safetensors`, the config, the
generation config and the tokenizer, and its marker (written last) lists what each module is and
stamps the weight file (models/convert_cache.py: a changed or truncated file is refused with the
command that rebuilds it, never loaded). The first load builds it from the GGUF alone (the float
model then lives in memory once, not on disk) and later loads read it: no float32 copy on disk. A
Llama-family copy is read into plain torch modules with transformers' names (models/light.py), so
loading never imports transformers' model code, and its tokenizer as the generic fast tokenizer
over its tokenizer.json (since session 13: 0.08 GB less resident for the default pair).

Outputs do not depend on which load made the model: tests compare the logits of a model built
from the GGUF with one read back from the folder, bit for bit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from adaspec.config import AdaspecError

VERSION = 3  # what the folder holds and how (bump when either changes: another folder, never a stale one)
WEIGHTS = "model.safetensors"
log = logging.getLogger("adaspec")


class GGUFEmbedding(nn.Module):
    """A token embedding kept as the GGUF file's quantised rows (any type the gguf package reads:
    Q4_K, Q5_0, Q8_0, ...), de-quantised row by row when looked up. Each looked-up row is exactly
    the float32 row a de-quantised copy of the file holds (tested), at the file's bits per weight
    (4.5 for Q4_K: 131 MB instead of 933 MB for the 1.5B's 151936 x 1536)."""

    def __init__(self, raw: torch.Tensor, qtype: int, embedding_dim: int):
        super().__init__()
        if raw.dtype != torch.uint8 or raw.dim() != 2:
            raise ValueError(f"GGUF embedding rows must be (V, bytes per row) uint8, got {tuple(raw.shape)} {raw.dtype}")
        self.register_buffer("raw", raw)
        self.qtype, self.embedding_dim = int(qtype), int(embedding_dim)
        self.num_embeddings = raw.shape[0]
        self.dtype = torch.float32

    @classmethod
    def from_gguf(cls, tensor) -> "GGUFEmbedding":
        """From a gguf.GGUFReader tensor (its rows: one per token)."""
        raw = np.ascontiguousarray(np.asarray(tensor.data)).view(np.uint8)
        raw = raw.reshape(int(tensor.shape[-1]), -1)  # gguf lists the shape innermost first: (hidden, V)
        return cls(torch.from_numpy(raw.copy()), int(tensor.tensor_type), int(tensor.shape[0]))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The float32 rows (n, embedding_dim) of token ids (n,)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        ids = ids.reshape(-1).to(torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must be in [0, {self.num_embeddings}), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        raw = self.raw[ids].numpy()
        out = dequantize(raw, GGMLQuantizationType(self.qtype)).astype(np.float32, copy=False)
        return torch.from_numpy(np.ascontiguousarray(out.reshape(ids.numel(), self.embedding_dim)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, where = torch.unique(ids.reshape(-1), return_inverse=True)
        return self.rows(unique)[where].reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf_type={self.qtype}"


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim): loading frees the int8
    layers' integers once fbgemm has packed them, and glibc keeps such pages otherwise. A no-op
    where there is no glibc."""
    import ctypes
    import ctypes.util

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def folder_for(root: Path, sha256: str) -> Path:
    return Path(root) / f"run-q4k-{sha256[:12]}-v{VERSION}"


def drop_damaged(root: Path, sha256: str) -> list[Path]:
    """Delete every damaged packed q4k model of the GGUF with this checksum under `root` (the next q4k
    load builds it again); returns the folders deleted."""
    from adaspec.models import convert_cache as cc

    return cc.drop_damaged(root, f"run-q4k-{sha256[:12]}-v*")


# ---- building from the GGUF ------------------------------------------------------------------------------

def embed_from_gguf(model: nn.Module, gguf_path: str | Path) -> None:
    """Replace the model's float token embedding by the GGUF file's own rows, after checking that
    they de-quantise to exactly the float rows (the model was converted from this file)."""
    from gguf import GGUFReader

    tensor = next((t for t in GGUFReader(str(gguf_path)).tensors if t.name == "token_embd.weight"), None)
    embed = model.get_input_embeddings()
    if tensor is None or not isinstance(embed, nn.Embedding):
        raise AdaspecError(f"{gguf_path}: no token_embd.weight for the model's token embedding")
    packed = GGUFEmbedding.from_gguf(tensor)
    weight = embed.weight.detach()
    if tuple(weight.shape) != (packed.num_embeddings, packed.embedding_dim):
        raise AdaspecError(f"{gguf_path}: token_embd.weight does not have the model's embedding shape; load the "
                           "model from this GGUF file")
    for start in range(0, packed.num_embeddings, 8192):  # in slices: no second float copy of the whole table
        ids = torch.arange(start, min(start + 8192, packed.num_embeddings))
        if not torch.equal(packed.rows(ids), weight[ids]):
            raise AdaspecError(f"{gguf_path}: token_embd.weight does not hold the model's embedding; load the model "
                               "from this GGUF file")
    model.set_input_embeddings(packed)


# ---- the folder --------------------------------------------------------------------------------------------

def save(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write everything `load` needs into the (empty, existing) folder, the marker last."""
    from safetensors.torch import save_file

    from adaspec.models import convert_cache as cc
    from adaspec.models.extension import BlockLinear
    from adaspec.models.quant import Int8Linear

    tensors, modules, plain = {}, {}, {}
    rotary = {n for n, m in model.named_modules() if n.endswith("rotary_emb")}
    for name, m in model.named_modules():
        if isinstance(m, BlockLinear):  # Q4_K or Q6_K tiles
            modules[name] = {"kind": m.kind, "kernel": m.kernel_name}
            tensors.update({f"{name}.{p}": getattr(m, p) for p in m.parts})
        elif isinstance(m, Int8Linear):
            w = m.weight_int8()
            modules[name] = {"kind": "int8", "levels": m.levels}
            tensors.update({f"{name}.int8": w.int_repr(), f"{name}.scale": w.q_per_channel_scales(),
                            f"{name}.zero": w.q_per_channel_zero_points(), f"{name}.rowsum": m.rowsum})
        elif isinstance(m, GGUFEmbedding):
            modules[name] = {"kind": "gguf-embedding", "qtype": m.qtype, "dim": m.embedding_dim}
            tensors[f"{name}.raw"] = m.raw
        elif isinstance(m, nn.Linear | nn.Embedding):
            raise AdaspecError(f"cannot keep {name} ({type(m).__name__}): only q4k, q6k, int8 and GGUF-embedding layers "
                               "are kept packed")
        else:
            if name in rotary:  # rebuilt from the config at load (its tensors are derived, some not buffers)
                continue
            for pname, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if t is not None:
                    plain[f"{name}.{pname}"] = "param" if pname in m._parameters else "buffer"
                    tensors[f"{name}.{pname}"] = t.detach()
            continue
        bias = getattr(m, "bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach()
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(folder / WEIGHTS))
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    getattr(tokenizer, "tok", tokenizer).save_pretrained(folder)
    (folder / cc.MARKER).write_text(json.dumps({"format": "q4k-runnable", "version": VERSION, "modules": modules,
                                                "plain": plain, "files": cc._stamp(folder)}, indent=1))


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each read from the file straight into its own memory.
    safetensors' `load` takes the file's bytes whole and copies each tensor out of them, so loading the
    1.5B's 1.15 GB peaked at twice that; here the peak is the tensors themselves."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        tensors = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            start, end = spec["data_offsets"]
            tensor = torch.empty(spec["shape"], dtype=DTYPES[spec["dtype"]])
            f.seek(8 + size + start)
            if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - start:
                raise ValueError(f"{path}: {name} ends past the end of the file")
            tensors[name] = tensor
    return tensors


def load(folder: Path, name: str, *, fix: str):
    """The adapter and tokenizer kept in `folder` (written by `save`): a Llama-family model as plain
    torch modules on adaspec's runtime (models/light.py, models/fast.py), any other as a transformers
    model (HFAdapter)."""
    from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast

    from adaspec.models import convert_cache as cc
    from adaspec.models import light
    from adaspec.models.hf import HFAdapter, HFTokenizer, _quiet_loading
    from adaspec.models.q4k import BLOCK_LAYERS
    from adaspec.models.quant import Int8Linear, _prepack, _quant_quiet, _use_row_attention

    why = cc.damaged(folder)
    if why is not None:
        raise AdaspecError(f"the packed q4k copy {folder} is damaged ({why}); {fix}")
    info = json.loads((folder / cc.MARKER).read_text())
    # read, not memory-mapped: a mapping stays resident whole while any tensor points into it, and the int8
    # layers' integers are only read once, to pack them for fbgemm (each tensor owns its bytes and is freed)
    tensors = read_tensors(folder / WEIGHTS)
    with _quiet_loading():
        config = AutoConfig.from_pretrained(folder)
        generation = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() else None
        if light.fits(config):  # plain torch modules: transformers' model code is never imported (models/light.py)
            model = light.CausalLM(config, generation)
        else:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            light.rebuild_rotary(model)
            if generation is not None:
                model.generation_config = generation
        # the folder's own tokenizer.json as the generic fast tokenizer: the same ids, text and chat
        # template as the model's own tokenizer class (tested), without the Python copy of the vocabulary
        # and merges that Qwen2's keeps beside the Rust one (0.06 GB)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    try:
        for mname, spec in info["modules"].items():
            bias = tensors.get(f"{mname}.bias")
            if spec["kind"] in BLOCK_LAYERS:  # Q4_K, Q6_K or Q5_0 tiles
                cls = BLOCK_LAYERS[spec["kind"]]
                module = cls.from_packed({p: tensors[f"{mname}.{p}"] for p in cls.parts}, bias,
                                         kernel_name=spec["kernel"])
            elif spec["kind"] == "int8":
                ints = tensors.pop(f"{mname}.int8")
                with _quant_quiet():
                    qweight = torch._make_per_channel_quantized_tensor(ints, tensors.pop(f"{mname}.scale"),
                                                                       tensors.pop(f"{mname}.zero"), 0)
                module = Int8Linear(_prepack(qweight), tensors[f"{mname}.rowsum"], bias, ints.shape[1],
                                    ints.shape[0], spec["levels"])
                del ints, qweight
            elif spec["kind"] == "gguf-embedding":
                module = GGUFEmbedding(tensors[f"{mname}.raw"], spec["qtype"], spec["dim"])
            else:
                raise KeyError(spec["kind"])
            parent, _, child = mname.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
        for key, kind in info["plain"].items():
            mname, _, pname = key.rpartition(".")
            owner = model.get_submodule(mname)
            if kind == "param":
                owner._parameters[pname] = nn.Parameter(tensors[key], requires_grad=False)
            else:
                owner._buffers[pname] = tensors[key]
    except (KeyError, AttributeError) as e:
        raise AdaspecError(f"the packed q4k copy {folder} does not fit its own config ({e}); {fix}") from None
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise AdaspecError(f"the packed q4k copy {folder} lacks {left[0]} (and {len(left) - 1} more); {fix}")
    model.eval()
    del tensors
    release_freed_memory()
    if isinstance(model, light.CausalLM):
        from adaspec.models.fast import FastDecoder

        adapter = FastDecoder(model, name, exact_rows=True)  # api.load_model makes a drafter's inexact
    else:
        _use_row_attention(model)
        adapter = HFAdapter(model, name=name)
    return adapter, HFTokenizer(tokenizer, eos_token_ids=adapter.eos_token_ids)


def load_q4k(dense, gguf: Path, root: Path, sha256: str, *, name: str, fix: str):
    """The q4k model of the GGUF file `gguf` (with this checksum): read from its packed folder under
    `root`, which the first load builds from `dense()`, the float model and tokenizer of that file."""
    from adaspec.models import convert_cache as cc

    folder = folder_for(root, sha256)
    if not cc.is_complete(folder):
        log.info("packing %s for q4k once, into %s", gguf.name, folder)
        adapter, tokenizer = build(dense, gguf)
        try:
            cc.publish(root, folder, lambda tmp: save(adapter.model, tokenizer, tmp))
        except OSError as e:
            log.warning("could not keep the packed q4k model in %s (%s); the next load builds it again", root,
                        e.strerror or e)
            adapter.name = name
            return adapter, tokenizer
        del adapter, tokenizer
        gc.collect()
    return load(folder, name, fix=fix)


def build(dense, gguf: Path):
    """The q4k model built from `dense()` (the float model and tokenizer converted from the GGUF file
    `gguf`) and that file's own Q4_K layers and embedding rows."""
    from adaspec.models.quant import quantize_adapter

    with _no_gguf_progress_bar():
        adapter, tokenizer = dense()
    quantize_adapter(adapter, "q4k", gguf=str(gguf))
    embed_from_gguf(adapter.model, gguf)
    return adapter, tokenizer


@contextlib.contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF reader draws a tqdm bar per load whatever its logging settings say; the CLI
    prints its own lines, so the bar is left out while the float model is read from the file."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:
        yield
        return
    bar = getattr(reader, "tqdm", None)
    reader.tqdm = lambda items, *args, **kwargs: items
    try:
        yield
    finally:
        reader.tqdm = bar
