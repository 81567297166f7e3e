"""Fast second start: keep a de-quantised copy of a GGUF model as safetensors.

De-quantising a GGUF into torch tensors (and rebuilding its tokenizer from GGUF metadata) takes
tens of seconds per model on CPU. The first load saves the dense model and its tokenizer with
`save_pretrained` into `<root>/converted-<sha256[:12]>-<dtype>/`; later loads hand that folder to
`from_pretrained`, which memory-maps the safetensors in seconds. The folder is keyed by the
GGUF's checksum and the dtype, so a changed file or another dtype never reuses a stale copy. It
is written under a temporary name and renamed once complete, so a crash leaves nothing that
looks usable. First and later loads then read the very same tensors: outputs do not depend on
whether the cache was warm.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from adaspec.config import AdaspecError

MARKER = "adaspec-converted.json"  # written last: provenance of the copy


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def converted_dir(root: Path, sha256: str, dtype: torch.dtype) -> Path:
    """Where the converted copy of the GGUF with this checksum lives, for this dtype."""
    return Path(root) / f"converted-{sha256[:12]}-{dtype_name(dtype)}"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def _load_dense(gguf: Path, dtype: torch.dtype):
    """De-quantise a GGUF into a plain transformers model (no GGUF-packed layers left)."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    try:  # newer transformers may keep weights packed when a GGUF kernel is installed; we want dense
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # the weights are dense now; this lets it save
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise AdaspecError(f"{gguf.name} loaded with GGUF-packed layers ({packed[0]}, ...) that cannot be "
                           f"saved densely; load it with convert_cache=False")
    return model


def _nbytes(model) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:  # tied weights are stored once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _disk_full(folder: Path, need: int | None) -> AdaspecError:
    size = f"about {need:,} bytes" if need else "more space"
    return AdaspecError(f"not enough disk space in {folder} for the converted model copy (needs {size}). "
                        f"Free some space, point ADASPEC_CACHE at a bigger disk, or load with "
                        f"convert_cache=False (every start then de-quantises the GGUF again).")


def convert(gguf: Path, dest: Path, dtype: torch.dtype, sha256: str) -> None:
    """De-quantise `gguf` and save model + tokenizer into the (empty, existing) folder `dest`."""
    import transformers
    from transformers import AutoTokenizer

    model = _load_dense(gguf, dtype)
    need = _nbytes(model)
    if shutil.disk_usage(dest).free < need:
        raise _disk_full(dest.parent, need)
    model.save_pretrained(dest)  # safetensors, the only format transformers 5 writes
    del model
    gc.collect()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(dest)
    (dest / MARKER).write_text(json.dumps({
        "gguf": gguf.name, "sha256": sha256, "dtype": dtype_name(dtype),
        "transformers": transformers.__version__}, indent=1))


def ensure_converted(gguf: Path, sha256: str, dtype: torch.dtype, root: Path) -> Path:
    """The converted copy of `gguf` (whose checksum is `sha256`) for `dtype`, creating it if needed."""
    dest = converted_dir(root, sha256, dtype)
    if is_complete(dest):
        return dest
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{dest.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the copy from other users of a shared cache
    try:
        convert(Path(gguf), tmp, dtype, sha256)
        if dest.exists() and not is_complete(dest):
            shutil.rmtree(dest)  # a copy without its marker was never finished
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest):  # else another process finished the same copy first: use it
                raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(Path(root), None) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
