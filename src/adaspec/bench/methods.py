"""Benchmark methods: named ways to generate from the same prompt ids, each returning a `MethodRun`.

A method name resolves, in this order, to
- a name added with `register_method` (later issues plug new methods in here);
- `oracle`: the real drafter, stopped exactly before its first token that disagrees with the
  target's known greedy continuation (the `ar` output of the same prompt), capped at k_max;
- `hf-ar` / `hf-assisted`: transformers' own `generate`, greedy, plain or with the drafter as
  `assistant_model` and transformers' default schedule and confidence threshold;
- `llamacpp-ar` / `llamacpp-spec`: llama.cpp on the same GGUF files, plain or with its own
  speculative decoding at its defaults (bench/anchors.py; needs the `anchors` extra);
- `fixed-kN` (any N): the `fixed` preset with k = N;
- any method of `adaspec.config.METHODS` (ar, fixed, heuristic, confidence-stop, cmasd, cmasd-k,
  cmasd-tau, entropy, ...), run by the adaspec engine. `cmasd-tau` defaults to tau_base = 0.1 (it
  would be `fixed` otherwise): it is LOSSY unless tau_base is overridden to 0.

Any name may carry knob overrides after colons, `cmasd:tau_base=0.1:gamma=2`; the whole string is
the method's label in records and reports (`adaspec sweep` names its grid points this way).
Options are layered: method defaults < the run's options < the label's overrides.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import cache

import torch

from adaspec.bench import anchors
from adaspec.bench.protocol import BenchMethod, MethodContext, MethodFn, MethodRun, MethodSkipped  # noqa: F401
from adaspec.config import METHODS, SAMPLING_KNOBS, SPEC_KNOBS, AdaspecError, make_config
from adaspec.drafters.base import DraftContext
from adaspec.drafters.model import ModelDrafter
from adaspec.records import Draft


def method_options(method: BenchMethod, run_options: dict, overrides: dict) -> dict:
    """The options a method runs with: its defaults < the run's options < the label's overrides."""
    return {**method.defaults, **run_options, **overrides}


BENCH_METHODS: dict[str, BenchMethod] = {}  # registered by name; the adaspec methods are found in config.METHODS


def register_method(name: str, fn: MethodFn, *, needs_drafter: bool = True, needs_reference: bool = False,
                    description: str = "", defaults: dict | None = None,
                    check: Callable[[object], None] | None = None) -> BenchMethod:
    """Add (or replace) a named method; `parse_label` finds registered names before built-in ones."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise AdaspecError(f"method names are letters, digits, '.', '_' and '-', got {name!r}")
    BENCH_METHODS[name] = BenchMethod(name, fn, needs_drafter, needs_reference, description, dict(defaults or {}),
                                      check)
    return BENCH_METHODS[name]


def parse_label(label: str) -> tuple[BenchMethod, dict]:
    """A method label ("cmasd", "fixed-k8", "cmasd:tau_base=0.1") -> (BenchMethod, label overrides)."""
    name, *pairs = label.strip().split(":")
    overrides = dict(_parse_pair(p, label) for p in pairs)
    if name in BENCH_METHODS:
        return BENCH_METHODS[name], overrides
    if m := re.fullmatch(r"fixed-k(\d+)", name):
        return _engine_method("fixed"), {"k": int(m.group(1)), **overrides}
    if name in METHODS:
        return _engine_method(name), overrides
    known = sorted(set(BENCH_METHODS) | set(METHODS) | {"fixed-kN"})
    raise AdaspecError(f"unknown method {name!r}; choose from: {', '.join(known)}")


def check_label(label: str, run_options: dict) -> tuple[BenchMethod, dict]:
    """parse_label, and for the adaspec engine's methods the options it would run with checked as
    make_config checks them, so that a bad grid or override value (alpha=2) is refused before any
    model loads, not recorded as an error on every prompt. Returns (method, its options)."""
    method, overrides = parse_label(label)
    options = method_options(method, run_options, overrides)
    if method.name in METHODS and method.name not in BENCH_METHODS:
        try:
            make_config(method.name, **options)
        except AdaspecError as e:
            raise AdaspecError(f"method {label!r}: {e}") from None
    return method, options


def _parse_pair(pair: str, label: str) -> tuple[str, object]:
    key, sep, raw = pair.partition("=")
    key = key.strip().replace("-", "_")
    known = set(SPEC_KNOBS) | set(SAMPLING_KNOBS)
    if not sep or key not in known or key == "method":
        raise AdaspecError(f"bad override {pair!r} in method {label!r}: write name:knob=value, knob one of "
                           f"{', '.join(sorted(known - {'method'}))}")
    return key, parse_value(raw)


def parse_value(raw: str):
    """'4' -> 4, '0.1' -> 0.1, 'none' -> None, anything else stays a string."""
    raw = raw.strip()
    if raw.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def parse_grid(specs: list[str]) -> dict[str, list]:
    """["alpha=0.5,1.0", "k_max=4,8"] -> {"alpha": [0.5, 1.0], "k_max": [4, 8]}."""
    grid = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise AdaspecError(f"bad grid axis {spec!r}: write knob=v1,v2,... (e.g. gamma=0.5,1,2)")
        _parse_pair(f"{key}=0", "sweep grid")  # checks the knob name
        grid[key] = [parse_value(v) for v in values.split(",") if v.strip()]
    if not grid:
        raise AdaspecError("the grid is empty: give at least one axis, e.g. --grid gamma=0.5,1,2")
    return grid


def grid_labels(method: str, grid: dict[str, list]) -> list[str]:
    """One method label per grid point: cmasd:alpha=0.5:gamma=1, ..."""
    import itertools

    keys = list(grid)
    return [method + "".join(f":{k}={v}" for k, v in zip(keys, point))
            for point in itertools.product(*(grid[k] for k in keys))]


# ---- the adaspec engine ------------------------------------------------------------------------

LOSSY_DEFAULTS = {"cmasd-tau": {"tau_base": 0.1}}  # method defaults, below the run's options


@cache
def _engine_method(name: str) -> BenchMethod:
    def run(ctx: MethodContext) -> MethodRun:
        cfg = make_config(name, **ctx.options, trace=ctx.trace and name != "ar")
        return run_loop(ctx.engine, ctx.engine.prepare(cfg), ctx.prompt_ids, cfg)

    return BenchMethod(name, run, needs_drafter=METHODS[name].drafter == "model",
                       description=f"adaspec method {name!r}", defaults=dict(LOSSY_DEFAULTS.get(name, {})),
                       check=_needs_head if METHODS[name].drafter in ("head", "head-lookup") else None)


def _needs_head(engine) -> None:
    if getattr(engine, "head", None) is None:
        raise MethodSkipped("needs a draft head (--head FILE; `adaspec train-head` trains one)")


def run_loop(engine, plan, prompt_ids: list[int], cfg) -> MethodRun:
    """Time one run of the adaspec decode loop with a prepared speculation (Engine.prepare)."""
    from adaspec.decode import generate_ids
    from adaspec.stopping import StopStrings

    stop = StopStrings(engine.tokenizer, cfg.stop) if cfg.stop and engine.tokenizer is not None else None
    t0 = time.perf_counter()
    r = generate_ids(engine.target, plan.drafter, prompt_ids, cfg, stop=stop, plan=plan)
    wall = time.perf_counter() - t0
    return MethodRun(token_ids=r.token_ids, wall_s=wall, new_tokens=len(r.token_ids), finish_reason=r.finish_reason,
                     lossless=r.lossless, stats=r.stats.to_dict(), trace=r.trace)


# ---- the oracle --------------------------------------------------------------------------------

class OracleDrafter:
    """Wraps a drafter; proposes its tokens only while they match the target's known continuation.

    Token by token the real drafter drafts d_i (one forward each, as it would anyway); the first d_i
    that differs from the reference is dropped and drafting stops, so under greedy verification
    every proposed token is accepted. That is an upper bound for any length policy over this
    drafter: it drafts exactly as far as acceptance reaches, never further, paying one drafter
    forward for the token that revealed the disagreement. Past the reference's end it proposes
    nothing.
    """

    def __init__(self, inner, prompt_len: int, reference: list[int]):
        self.inner, self.prompt_len, self.reference = inner, prompt_len, reference
        self.name = "oracle"
        self.vocab_size = inner.vocab_size

    @property
    def forwards(self) -> int:
        return self.inner.forwards

    @property
    def signal_s(self) -> float:
        return self.inner.signal_s

    def begin(self, prompt: torch.Tensor) -> None:
        self.inner.begin(prompt)

    def commit(self, valid_len: int) -> None:
        self.inner.commit(valid_len)

    def propose(self, seq: torch.Tensor, max_k: int, ctx: DraftContext) -> Draft:
        pos = seq.shape[0] - self.prompt_len  # index of the next new token in the reference
        truth = self.reference[pos:pos + max_k]
        tokens, probs, signals = [], [], []
        for want in truth:
            d = self.inner.propose(seq, 1, ctx)  # feeds what it has not seen
            if int(d.tokens[0]) != want:  # host sync per token: the oracle decides on the host
                break
            tokens.append(d.tokens)
            signals += d.signals
            if d.probs is not None:
                probs.append(d.probs)
            seq = torch.cat([seq, d.tokens])
        empty = torch.zeros(0, dtype=torch.long, device=seq.device)
        return Draft(tokens=torch.cat(tokens) if tokens else empty, probs=torch.cat(probs) if probs else None,
                     signals=signals, drafter=self.name)


def _oracle(ctx: MethodContext) -> MethodRun:
    if ctx.reference_ids is None:
        raise AdaspecError("the oracle needs the `ar` output of the same prompt: run `ar` first")
    if ctx.engine.drafter is None:
        raise MethodSkipped("the oracle needs a drafter model")
    opts = dict(ctx.options)
    k_max = opts.pop("k_max", None) or SPEC_KNOBS["k_max"].metadata["fallback"]
    opts.pop("k", None)
    cfg = make_config("fixed", k=k_max, k_max=k_max, trace=ctx.trace, **opts)
    drafter = OracleDrafter(ModelDrafter(ctx.engine.drafter), len(ctx.prompt_ids), ctx.reference_ids)
    return run_loop(ctx.engine, ctx.engine.prepare(cfg, drafter=drafter), ctx.prompt_ids, cfg)


# ---- transformers' generate ----------------------------------------------------------------------

def hf_model(adapter, role: str):
    if getattr(adapter, "draft_ids", None) is not None:
        raise MethodSkipped(f"hf-* baselines cannot use the {role} {adapter.name!r}: its output head is cut to a "
                            "pruned drafting vocabulary (--draft-vocab)")
    model = getattr(adapter, "model", None)
    if model is not None:
        from adaspec.models.light import transformers_model

        model = transformers_model(model)  # a packed q4k copy: transformers' model around its modules
    if model is None or not callable(getattr(model, "generate", None)):
        raise MethodSkipped(f"hf-* baselines need transformers models; the {role} {adapter.name!r} is not one "
                            "(the built-in toy models have no transformers counterpart)")
    return model


def hf_generation_config(ctx: MethodContext, eos: tuple[int, ...]):
    """A fresh GenerationConfig with adaspec's decoding settings, so that no sampling default or
    repetition penalty from the checkpoint's generation_config.json changes the output."""
    from transformers import GenerationConfig

    o = ctx.options
    if o.get("stop"):
        raise MethodSkipped("hf-* baselines do not take stop strings here; run the benchmark without --stop")
    temperature = o.get("temperature", 0.0)
    kw = dict(max_new_tokens=o.get("max_new_tokens", 128), num_beams=1)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=o.get("top_k", 0), top_p=o.get("top_p", 1.0))
    else:
        kw.update(do_sample=False)
    if o.get("ignore_eos"):
        eos = ()
    # eos ids as adaspec's target uses them; generation stops on them and keeps them in the output.
    # An empty list, not None: None would be filled in from the checkpoint's generation_config.
    kw.update(eos_token_id=list(eos), pad_token_id=eos[0] if eos else 0)
    return GenerationConfig(**kw)


def _hf_generate(ctx: MethodContext, assistant: bool) -> MethodRun:
    import transformers

    engine = ctx.engine
    model = hf_model(engine.target, "target")
    kwargs, info = {}, {}
    if assistant:
        if engine.drafter is None:
            raise MethodSkipped("hf-assisted needs a drafter model")
        kwargs["assistant_model"] = hf_model(engine.drafter, "drafter")
        info = hf_assisted_defaults(kwargs["assistant_model"])
    gen = hf_generation_config(ctx, tuple(engine.target.eos_token_ids))
    ids = torch.tensor([ctx.prompt_ids], dtype=torch.long, device=model.device)
    if ctx.options.get("seed") is not None:
        torch.manual_seed(ctx.options["seed"])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its deprecation notices would interleave with the progress bar
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen, **kwargs)
        new = out[0, ids.shape[1]:].tolist()  # host sync at the end of the timed region
        wall = time.perf_counter() - t0
    finally:
        transformers.logging.set_verbosity(verbosity)
    eos = set(gen.eos_token_id or ())
    finish = "eos" if new and new[-1] in eos else "length"
    return MethodRun(token_ids=new, wall_s=wall, new_tokens=len(new), finish_reason=finish,
                     lossless=gen.do_sample is False, info=info)


def hf_assisted_defaults(assistant_model) -> dict:
    """The draft schedule transformers will use with this assistant: its generation_config's
    values where set, else transformers' global defaults (20 tokens, "constant", threshold 0.4,
    the threshold re-fitted during generation only when scikit-learn is installed)."""
    import importlib.util

    from transformers import GenerationConfig

    cfg = assistant_model.generation_config
    defaults = getattr(GenerationConfig, "_get_default_generation_params", lambda: {})()
    info = {}
    for key in ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold"):
        value = getattr(cfg, key, None)
        info[key] = value if value is not None else defaults.get(key)
    info["threshold_refit"] = importlib.util.find_spec("sklearn") is not None
    return info


register_method("oracle", _oracle, needs_reference=True,
                description="real drafter, stopped before its first token that disagrees with ar's output")
def _hf_check(assistant: bool):
    def check(engine) -> None:
        hf_model(engine.target, "target")
        if assistant and engine.drafter is not None:
            hf_model(engine.drafter, "drafter")
    return check


register_method("hf-ar", lambda ctx: _hf_generate(ctx, assistant=False), needs_drafter=False,
                description="transformers generate, greedy", check=_hf_check(False))
register_method("hf-assisted", lambda ctx: _hf_generate(ctx, assistant=True),
                description="transformers generate(assistant_model=drafter), default schedule and threshold",
                check=_hf_check(True))
register_method("llamacpp-ar", anchors.llamacpp_ar, needs_drafter=False, check=anchors.available(False),
                description="llama.cpp (llama-cpp-python) plain greedy decoding on the same GGUF")
register_method("llamacpp-spec", anchors.llamacpp_spec, check=anchors.available(True),
                description="llama.cpp's speculative decoding with the draft model, at its defaults")
