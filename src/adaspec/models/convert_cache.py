"""Fast second start: keep a de-quantised copy of a GGUF model as safetensors.

De-quantising a GGUF into torch tensors (and rebuilding its tokenizer from GGUF metadata) takes
tens of seconds per model on CPU. The first load saves the dense model and its tokenizer with
`save_pretrained` into `<root>/converted-<sha256[:12]>-<dtype>/`; later loads hand that folder to
`from_pretrained`, which memory-maps the safetensors in seconds. The folder is keyed by the
GGUF's checksum and the dtype, so a changed file or another dtype never reuses a stale copy. It
is written under a temporary name and renamed once complete, so a crash leaves nothing that
looks usable. First and later loads then read the very same tensors: outputs do not depend on
whether the cache was warm.

A q4k load does not read this copy: it keeps its own packed copy (models/packed.py), which it
builds from this copy when one exists, else from the GGUF in memory. This copy serves `--quant
int8` and `none`, and q4k with a pruned drafting vocabulary.

Every weight file is stamped in the marker with its size, modification time and sha256. A load
checks size and time (cheap); a file whose time changed is re-hashed, and one that no longer
matches is refused (`damaged`), never loaded: `adaspec models pull NAME` rebuilds it (`repair`).
A copy made before stamps existed is stamped at its first check.
"""

from __future__ import annotations

import errno
import gc
import hashlib
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _stamp(folder: Path) -> dict:
    """size, mtime and sha256 of every weight file of a converted copy."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix == ".safetensors")
    return {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": _sha256(p)}
            for p in files}


def damaged(folder: Path) -> str | None:
    """Why a complete converted copy must not be loaded (a weight file missing, truncated or changed),
    or None. Re-hashes only the files whose modification time moved."""
    marker = Path(folder) / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return f"its marker {marker.name} is unreadable"
    if "files" not in info:  # made before stamps: stamp it now
        info["files"] = _stamp(folder)
        _write_marker(marker, info)
        return None
    changed = False
    for name, want in info["files"].items():
        p = Path(folder) / name
        if not p.is_file():
            return f"{name} is missing"
        st = p.stat()
        if st.st_size != want["size"]:
            return f"{name} has {st.st_size:,} bytes instead of {want['size']:,}"
        if st.st_mtime_ns != want["mtime_ns"]:
            if _sha256(p) != want["sha256"]:
                return f"{name} was changed after it was written (its sha256 differs)"
            want["mtime_ns"], changed = st.st_mtime_ns, True  # touched, not changed
    if changed:
        _write_marker(marker, info)
    return None


def _write_marker(marker: Path, info: dict) -> None:
    try:
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(marker)
    except OSError:  # a read-only cache: the stamp is checked again next time, which is only slower
        pass


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
    write_marker(dest, gguf.name, sha256, dtype, transformers=transformers.__version__)


def write_marker(dest: Path, gguf_name: str, sha256: str, dtype: torch.dtype, **extra) -> None:
    """The marker that makes `dest` a complete copy, with the stamp of its weight files (written last)."""
    (dest / MARKER).write_text(json.dumps({"gguf": gguf_name, "sha256": sha256, "dtype": dtype_name(dtype),
                                           **extra, "files": _stamp(dest)}, indent=1))


def drop_damaged(root: Path, pattern: str) -> list[Path]:
    """Delete every finished cache folder under `root` matching the glob `pattern` whose files no
    longer match their stamps (`damaged`); returns the folders deleted."""
    dropped = []
    for folder in sorted(Path(root).glob(pattern)):
        if folder.is_dir() and is_complete(folder) and damaged(folder) is not None:
            shutil.rmtree(folder)
            dropped.append(folder)
    return dropped


def repair(root: Path, gguf: Path, sha256: str) -> list[Path]:
    """Rebuild every damaged converted copy of `gguf` under `root`; returns the folders rebuilt."""
    rebuilt = drop_damaged(root, f"converted-{sha256[:12]}-*")
    for folder in rebuilt:
        ensure_converted(gguf, sha256, getattr(torch, folder.name.rsplit("-", 1)[1]), root)
    return rebuilt


def publish(root: Path, dest: Path, write) -> None:
    """Fill a cache folder under a temporary name beside `dest` with `write(folder)` (which writes
    the marker last), then rename it to `dest`. An unfinished `dest` (no marker) is replaced; a
    finished one that another process wrote meanwhile is kept. The temporary folder never
    outlives the call; OSErrors reach the caller."""
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{dest.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the copy from other users of a shared cache
    try:
        write(tmp)
        if dest.exists() and not is_complete(dest):
            shutil.rmtree(dest)  # a copy without its marker was never finished
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest):  # else another process finished the same copy first: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_converted(gguf: Path, sha256: str, dtype: torch.dtype, root: Path) -> Path:
    """The converted copy of `gguf` (whose checksum is `sha256`) for `dtype`, creating it if needed."""
    dest = converted_dir(root, sha256, dtype)
    if is_complete(dest):
        return dest
    try:
        publish(root, dest, lambda tmp: convert(Path(gguf), tmp, dtype, sha256))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(Path(root), None) from e
        raise
    return dest
