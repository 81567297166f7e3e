"""What identifies a model, a machine and the software: read by calibration profiles (to refuse a
profile made for another pair) and by benchmark runs (to record what produced their figures)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch

TOY_MODELS = ("tiny", "tiny-draft")


def preset_sha256(name: str) -> str | None:
    """The pinned sha256 of a model preset's weights, None for anything else."""
    try:
        from adaspec.models.registry import PRESETS
    except ImportError:  # the registry's optional dependencies are missing: names still identify presets
        return None
    return PRESETS[name].sha256 if name in PRESETS else None


def model_identity(adapter, name: str | None = None) -> dict:
    """What identifies a model for a profile: name, vocabulary, registry sha256, weight fingerprint."""
    from adaspec.models.quant import is_quantized

    name = name or adapter.name
    return {"name": name, "vocab_size": int(adapter.vocab_size), "sha256": preset_sha256(name),
            "fingerprint": weights_fingerprint(adapter), "quantized": is_quantized(adapter)}


def weights_fingerprint(adapter, samples: int = 1024) -> str | None:
    """sha256 over every tensor's name, shape, dtype and a strided sample of its values (fast even for
    billions of weights); None when the adapter exposes no torch model. dtype, quantisation and the
    activations' form of block layers (q4k against q4k-a16) change it."""
    model = getattr(adapter, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples)][:samples].contiguous().cpu()
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    # q4k-a16 computes with the same weights as q4k but other numbers and costs (models/extension.ACTS)
    forms = sorted({getattr(m, "acts", "a8") for m in model.modules()} - {"a8"})
    if forms:
        h.update(f"acts:{','.join(forms)};".encode())
    return h.hexdigest()


def identity_mismatch(expected: dict, got: dict) -> str | None:
    """Why two identities name different models, or None. The weights' fingerprint decides where
    both have one; else the pinned sha256; else the name."""
    if expected.get("vocab_size") != got.get("vocab_size"):
        return f"vocabulary {got.get('vocab_size')} instead of {expected.get('vocab_size')}"
    if expected.get("fingerprint") and got.get("fingerprint"):
        if expected.get("quantized") != got.get("quantized"):
            return ("int8-quantised, the profile's model was not" if got.get("quantized")
                    else "not int8-quantised, the profile's model was: add --quant int8")
        if expected["fingerprint"] != got["fingerprint"]:
            return "different weights, dtype or activation form (q4k and q4k-a16 have a profile each)"
        return None
    if expected.get("sha256") and got.get("sha256"):
        return None if expected["sha256"] == got["sha256"] else "different sha256"
    return None if expected.get("name") == got.get("name") else "different name"


def model_info(adapter, name: str | None) -> dict:
    """What a benchmark run records of a model: name, class, dtype, parameters and (for registry
    presets) the pinned sha256 of the weights."""
    info = {"name": name or adapter.name, "adapter": type(adapter).__name__, "vocab_size": adapter.vocab_size}
    model = getattr(adapter, "model", None)
    if isinstance(model, torch.nn.Module):
        params = list(model.parameters())
        info["dtype"] = str(params[0].dtype).removeprefix("torch.") if params else None
        info["parameters"] = sum(p.numel() for p in params)
    if name in TOY_MODELS:
        info["sha256"] = "built-in seeded toy model (no weights file)"
    else:
        info["sha256"] = preset_sha256(name) if name else None
    return info


def machine_name() -> str:
    """The CPU model name (from /proc/cpuinfo where there is one), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else machine_name()


def machine_info() -> dict:
    """The machine a benchmark ran on: CPU model, CPU and core counts, torch threads, platform, GPU."""
    info = {"cpu": None, "cpus": os.cpu_count(), "cores": None, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name")
        if fields.get("Core(s) per socket") and fields.get("Socket(s)"):
            info["cores"] = int(fields["Core(s) per socket"]) * int(fields["Socket(s)"])
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    if not info["cpu"]:
        info["cpu"] = machine_name()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "adaspec"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
