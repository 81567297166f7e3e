"""Configuration: the methods, the sampling settings and every speculation knob, each declared once.

A knob is a dataclass field made with `knob(default, doc)`. Its doc is the help of its CLI flag
(cli.add_option_args), of its field in the server's `speculation` object and of its
`name:knob=value` override in `adaspec bench`, so a new knob touches this file (and the
docs/method.md entry that gives its reason) and nothing else. Validation lives here too, so bad
input fails before any model runs.

"Unset" is None, never "equal to the default": a knob that a calibration profile may set
(`fallback=` below) defaults to None, and `SpecConfig.resolved` fills what is still unset, in this
order: an explicit value, then the profile's (calibrated methods only), then the built-in fallback.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import NamedTuple


class AdaspecError(ValueError):
    """A user-facing error: the message says what was wrong and what to do."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AdaspecError(msg)


def check_text(text: str, what: str) -> None:
    """Text must be valid Unicode: a lone surrogate (as JSON's \\ud800 escapes make) has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise AdaspecError(f"{what} is not valid Unicode text: a lone surrogate {text[e.start]!r} at character "
                           f"{e.start}; send UTF-8 text") from None


def knob(default, doc: str, *, fallback=None, choices: tuple[str, ...] | None = None, cli: bool = True):
    """A configuration field with its documentation.

    fallback: the built-in value of a knob whose default is None (unset), used when neither the
        request nor a calibration profile sets it.
    choices: the allowed strings of a string knob.
    cli: False for fields that are not a knob of a request (set by the API, not a flag).
    """
    meta = {"doc": doc, "fallback": fallback, "choices": choices, "cli": cli}
    return field(default=default, metadata=meta)


def doc(f: Field) -> str:
    """A field's documentation, with its default or fallback."""
    text = f.metadata.get("doc", "")
    value = f.metadata.get("fallback") if f.default is None else f.default
    if value is None or value == () or f.default is MISSING:
        return text
    return f"{text} (default {_show(value)})"


def _show(value) -> str:
    if isinstance(value, tuple):
        return " ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


# The methods: which draft-length policy, which verification rule and which drafter each uses.
# "exact" means greedy match at temperature 0 and rejection sampling above it (both lossless).
# Drafters: "model" (the small model), "ngram" (prompt lookup, free), "head" (the draft head on the
# target's features, drafters/head.py), "head-lookup" (prompt lookup or the head, whichever has the
# higher expected goodput each step; drafters/hybrid.py), "pool" (lookup, the model, the head or no
# draft, whichever has the highest expected goodput each step; see drafters/pool.py).
class Method(NamedTuple):
    length: str
    verify: str
    drafter: str
    calibrated: bool = False  # reads lambdas, entropy_threshold, skip_entropy and k_max from a profile


METHODS: dict[str, Method] = {
    "ar": Method("none", "exact", "none"),
    "fixed": Method("fixed", "exact", "model"),
    "heuristic": Method("heuristic", "exact", "model"),
    "confidence-stop": Method("confidence-stop", "exact", "model"),
    "cmasd": Method("cmasd", "confidence-tau", "model"),
    "cmasd-k": Method("cmasd", "exact", "model"),
    "cmasd-tau": Method("fixed", "confidence-tau", "model"),
    "entropy": Method("entropy", "entropy-tau", "model"),
    "ngram": Method("fixed", "exact", "ngram"),
    "multi-draft": Method("cmasd", "confidence-tau", "pool"),
    "head": Method("cost-aware", "exact", "head"),  # priced by the head itself (policies/cost.py)
    "head-lookup": Method("cost-aware", "exact", "head-lookup"),  # the head's length, lookup where it pays more
    # Calibrated methods read a pair's profile (`adaspec calibrate`; docs/calibration.md).
    "entropy-calibrated": Method("entropy", "entropy-tau", "model", calibrated=True),
    "cost-aware": Method("cost-aware", "exact", "model", calibrated=True),
    "multi-draft-calibrated": Method("cmasd", "confidence-tau", "pool", calibrated=True),
}
CALIBRATED_METHODS = tuple(name for name, m in METHODS.items() if m.calibrated)

# Verification rules, by the names the `verify` knob takes, and the acceptance test of verify.py each
# runs: both tau rules run CM-ASD's relaxed acceptance, with thresholds from policies/threshold.py.
VERIFY_RULES: dict[str, str] = {"exact": "exact", "confidence-tau": "relaxed", "entropy-tau": "relaxed",
                                "typical": "typical"}
SIGNALS = ("ensemble", "entropy", "logit", "soft")


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn from a distribution; applied identically to drafter (p) and target (q).

    temperature 0 (or anything below 1e-5) means greedy decoding (argmax), the lossless baseline.
    """

    temperature: float = knob(0.0, "sampling temperature; 0 = greedy, > 0 samples losslessly")
    top_k: int = knob(0, "top-k sampling filter; 0 = off")
    top_p: float = knob(1.0, "nucleus sampling mass; 1.0 = off")
    seed: int | None = knob(None, "random seed of sampled runs; unset = nondeterministic")

    def validate(self) -> "SamplingConfig":
        t = self.temperature
        _check(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0,
               f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        _check(self.seed is None or isinstance(self.seed, int),
               f"seed must be an integer or None, got {self.seed!r}")
        return self

    @property
    def greedy(self) -> bool:
        # Below 1e-5 the tempered softmax underflows to garbage; such a temperature means greedy.
        return self.temperature < 1e-5


@dataclass(frozen=True)
class SpecConfig:
    """Every speculation knob. Each field's doc says what it does; docs/method.md gives the reason
    for every default."""

    method: str = knob("cmasd", "speculation method", choices=tuple(METHODS))
    # draft length
    k: int = knob(4, "draft length of `fixed` (and of `ngram`, `cmasd-tau`)")
    k_min: int = knob(1, "smallest draft of every adaptive policy")
    k_max: int | None = knob(None, "largest draft of every adaptive policy; a profile sets it for calibrated "
                                   "methods", fallback=8)
    alpha: float = knob(1.0, "CM-ASD aggressiveness in (0, 1]: the share of [k_min, k_max] full confidence opens")
    confidence_stop: float = knob(0.4, "`confidence-stop` stops after a token whose drafter probability is below this")
    entropy_threshold: float | None = knob(None, "`entropy` stops drafting above this normalised entropy H/log V; "
                                                 "a profile sets it for calibrated methods", fallback=0.3)
    heuristic_start: int = knob(5, "starting draft length of `heuristic`")
    # verification (only the tau rules with tau_base > 0 and `typical` are lossy)
    tau_base: float = knob(0.0, "relaxed-acceptance gap bound at full confidence; > 0 makes the tau rules LOSSY")
    gamma: float = knob(1.0, "sensitivity of tau_t = tau_base * C_t ** gamma to drops in confidence")
    beta: int = knob(3, "a relaxed token must be in the target's top-beta")
    typical_eps: float = knob(0.09, "typical acceptance: q(x) > min(eps, delta * exp(-H(q)))")
    typical_delta: float = knob(0.3, "typical acceptance: q(x) > min(eps, delta * exp(-H(q)))")
    verify: str | None = knob(None, "override the method's verification rule", choices=tuple(VERIFY_RULES))
    # signals
    lambdas: tuple[float, float, float] | None = knob(
        None, "weights of (entropy, logit margin, softmax margin) in the confidence C; a profile sets them for "
              "calibrated methods", fallback=(1 / 3, 1 / 3, 1 / 3))
    signal: str = knob("ensemble", "score driving the policies: the ensemble C or one signal alone (debugging)",
                       choices=SIGNALS)
    logit_scale: float = knob(2.0, "s in c_logit = 1 - exp(-(l1 - l2) / s)")
    # drafters
    max_ngram: int = knob(3, "longest n-gram prompt lookup matches (shorter ones are tried down to min_ngram)")
    min_ngram: int = knob(1, "shortest n-gram prompt lookup matches")
    skip_entropy: float | None = knob(None, "the pool considers no model drafter while their recent first-token "
                                            "normalised entropy is above this; a profile sets it for calibrated "
                                            "methods", fallback=1.0)
    draft_context: int | None = knob(None, "the drafter model reads only a prompt's last N tokens (unset: all): "
                                           "cheaper prefill of long prompts, same output")

    def validate(self) -> "SpecConfig":
        _check(self.method in METHODS,
               f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        s = self.resolved()  # the checks below see the values this config would run with
        for name in ("k", "k_min", "k_max", "heuristic_start", "beta", "max_ngram", "min_ngram"):
            v = getattr(s, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                   f"{name} must be an integer >= 1, got {v!r}")
        _check(s.draft_context is None or (isinstance(s.draft_context, int) and s.draft_context >= 1),
               f"draft_context must be a positive number of tokens or None, got {s.draft_context!r}")
        _check(s.k_min <= s.k_max, f"k_min ({s.k_min}) must not exceed k_max ({s.k_max})")
        _check(s.min_ngram <= s.max_ngram, f"min_ngram ({s.min_ngram}) must not exceed max_ngram ({s.max_ngram})")
        _check(s.k_max <= 64, f"k_max must be at most 64, got {s.k_max}")
        _check(s.k <= 64, f"k must be at most 64, got {s.k}")
        _check(0 < s.alpha <= 1, f"alpha must be in (0, 1], got {s.alpha!r}")
        for name in ("confidence_stop", "entropy_threshold", "tau_base", "typical_eps", "typical_delta",
                     "skip_entropy"):
            v = getattr(s, name)
            _check(isinstance(v, (int, float)) and 0 <= v <= 1, f"{name} must be in [0, 1], got {v!r}")
        _check(s.gamma >= 0, f"gamma must be >= 0, got {s.gamma!r}")
        _check(s.logit_scale > 0, f"logit_scale must be > 0, got {s.logit_scale!r}")
        _check(len(s.lambdas) == 3 and all(w >= 0 for w in s.lambdas) and sum(s.lambdas) > 0,
               f"lambdas must be three non-negative weights with a positive sum, got {s.lambdas!r}")
        _check(s.signal in SIGNALS, f"signal must be one of {SIGNALS}, got {s.signal!r}")
        _check(s.verify is None or s.verify in VERIFY_RULES,
               f"verify must be one of {tuple(VERIFY_RULES)}, got {s.verify!r}")
        return self

    def resolved(self, calibrated: dict | None = None) -> "SpecConfig":
        """Every unset knob filled: from `calibrated` (a profile's knobs) where given, else from its
        built-in fallback. An explicit value is never replaced."""
        changes = {}
        for f in fields(self):
            if getattr(self, f.name) is None and f.metadata.get("fallback") is not None:
                changes[f.name] = (calibrated or {}).get(f.name, f.metadata["fallback"])
        return replace(self, **changes) if changes else self

    @property
    def length_policy(self) -> str:
        return METHODS[self.method].length

    @property
    def verify_rule(self) -> str:
        return self.verify or METHODS[self.method].verify

    @property
    def drafter_kind(self) -> str:
        return METHODS[self.method].drafter

    @property
    def calibrated(self) -> bool:
        """Whether this method reads a calibration profile's knobs."""
        return METHODS[self.method].calibrated

    @property
    def lossless(self) -> bool:
        """Whether this configuration reproduces the target exactly."""
        rule = self.verify_rule
        if rule == "exact":
            return True
        if rule in ("confidence-tau", "entropy-tau"):
            # tau_base = 0 switches the relaxed rule off: the loop then verifies exactly (plan.prepare),
            # whatever beta is, so ties with the target's top token cannot slip in either.
            return self.tau_base == 0
        return False  # typical acceptance is lossy whatever its thresholds

    def with_(self, **changes) -> "SpecConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        _check(not unknown, f"unknown speculation option(s): {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(f.name for f in fields(self))}")
        return replace(self, **changes)


@dataclass(frozen=True)
class GenerationConfig:
    """One request: how many tokens, when to stop, how to sample, how to speculate."""

    max_new_tokens: int = knob(128, "new tokens to generate")
    stop: tuple[str, ...] = knob((), "stop string (repeatable); generation ends where one completes")
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    trace: bool = knob(False, "record a per-step trace of signals and verdicts", cli=False)
    ignore_eos: bool = knob(False, "keep generating past end-of-sequence")

    def validate(self) -> "GenerationConfig":
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop strings must be non-empty strings, got {self.stop!r}")
        for s in self.stop:
            check_text(s, f"stop string {s!r}")
        self.sampling.validate()
        self.spec.validate()
        return self


def _knobs(cls) -> dict[str, Field]:
    return {f.name: f for f in fields(cls) if "doc" in f.metadata}


# Every request option by name, in the three groups make_config splits them into.
SAMPLING_KNOBS: dict[str, Field] = _knobs(SamplingConfig)
SPEC_KNOBS: dict[str, Field] = _knobs(SpecConfig)
GENERATION_KNOBS: dict[str, Field] = _knobs(GenerationConfig)
OPTIONS: dict[str, Field] = {**GENERATION_KNOBS, **SAMPLING_KNOBS, **SPEC_KNOBS}


def make_config(method: str = "cmasd", **options) -> GenerationConfig:
    """Split flat keyword options into a validated GenerationConfig; unknown names are an error."""
    unknown = (set(options) - set(OPTIONS)) | ({"method"} & set(options))  # the method is the first argument
    if unknown:
        known = sorted(set(OPTIONS) - {"method"})
        raise AdaspecError(f"unknown option(s) {', '.join(sorted(unknown))}; known options: {', '.join(known)}")
    stop = options.pop("stop", ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if options.get("lambdas") is not None:
        options["lambdas"] = tuple(options["lambdas"])
    sampling = SamplingConfig(**{k: v for k, v in options.items() if k in SAMPLING_KNOBS})
    spec = SpecConfig(method=method, **{k: v for k, v in options.items() if k in SPEC_KNOBS})
    gen = {k: v for k, v in options.items() if k in GENERATION_KNOBS}
    return GenerationConfig(stop=stop, sampling=sampling, spec=spec, **gen).validate()
