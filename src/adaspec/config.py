"""Configuration dataclasses: sampling settings and every speculation knob, with the reason for
each default. Validation lives here so that bad input fails before any model runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple


class AdaspecError(ValueError):
    """A user-facing error: the message says what was wrong and what to do."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AdaspecError(msg)


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn from a distribution; applied identically to drafter (p) and target (q).

    temperature 0 (or anything below 1e-5) means greedy decoding (argmax), the lossless baseline.
    """

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int | None = None  # None = nondeterministic; any int makes sampled runs reproducible

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


# The method presets: which draft-length policy, which verification rule and which drafter each uses.
# "exact" means greedy match at temperature 0 and rejection sampling above it (both lossless).
# Drafters: "model" (the small model), "ngram" (prompt lookup, free), "pool" (lookup, the model or no
# draft, whichever has the highest expected goodput each step; see drafters/pool.py).
class Preset(NamedTuple):
    length: str
    verify: str
    drafter: str


PRESETS: dict[str, Preset] = {
    "ar": Preset("none", "exact", "none"),
    "fixed": Preset("fixed", "exact", "model"),
    "heuristic": Preset("heuristic", "exact", "model"),
    "confidence-stop": Preset("confidence-stop", "exact", "model"),
    "cmasd": Preset("cmasd", "confidence-tau", "model"),
    "cmasd-k": Preset("cmasd", "exact", "model"),
    "cmasd-tau": Preset("fixed", "confidence-tau", "model"),
    "entropy": Preset("entropy", "entropy-tau", "model"),
    "ngram": Preset("fixed", "exact", "ngram"),
    "multi-draft": Preset("cmasd", "confidence-tau", "pool"),
    # Calibrated methods read a pair's profile (`adaspec calibrate`; docs/calibration.md).
    "entropy-calibrated": Preset("entropy", "entropy-tau", "model"),
    "cost-aware": Preset("cost-aware", "exact", "model"),
    "multi-draft-calibrated": Preset("cmasd", "confidence-tau", "pool"),
}
# Methods that take lambdas, entropy_threshold and skip_entropy from a calibration profile where
# those knobs are left at their defaults (and warn when run without one); see profile.calibrated_spec.
CALIBRATED_METHODS = ("entropy-calibrated", "cost-aware", "multi-draft-calibrated")

VERIFY_RULES = ("exact", "confidence-tau", "entropy-tau", "typical")
SIGNALS = ("ensemble", "entropy", "logit", "soft")


@dataclass(frozen=True)
class SpecConfig:
    """Every speculation knob. Defaults are documented in docs/method.md.

    Draft length
      k: draft length of `fixed` (and starting length of `heuristic`). 4: on CPU a 5-token
         verification already costs several single-token forwards, so longer fixed drafts rarely pay.
      k_min, k_max: bounds of every adaptive policy. k_min=1 so that a step always speculates;
         k_max=8 is where the target's forward cost starts to climb steeply on both CPU and GPU.
      alpha: CM-ASD aggressiveness in (0, 1]: the share of [k_min, k_max] that full confidence opens.
      confidence_stop: `confidence-stop` stops when the drafter's probability of its own token
         falls below this (0.4 is transformers' `assistant_confidence_threshold` default).
      entropy_threshold: `entropy` stops drafting when the normalised entropy H/log V exceeds this.
         0.3 was a starting point; `adaspec calibrate` fits a pair-specific value.
    Verification (only `confidence-tau`, `entropy-tau` and `typical` are lossy, and only when
    their thresholds are above 0)
      tau_base: relaxed-acceptance gap bound at full confidence. 0.0 by default, which makes the
         CM-ASD rule identical to exact greedy matching: lossy acceptance is opt-in.
      gamma: sensitivity of tau_t = tau_base * C_t ** gamma to drops in confidence.
      beta: a relaxed token must be in the target's top-beta. 3: with beta = 1 only the target's
         own top token could be accepted and tau would have no effect at all.
      typical_eps, typical_delta: Medusa's typical acceptance, q(x) > min(eps, delta * exp(-H(q))).
    Drafter pool (`ngram`, `multi-draft`)
      max_ngram: longest context n-gram the prompt-lookup drafter matches (3, as transformers'
         prompt lookup uses); shorter ones are tried when it fails, down to 1.
      skip_entropy: the pool considers no model drafter while their recent first-token normalised
         entropy is above this (lookup may still draft); 1.0 (never) until `adaspec calibrate` fits
         a value for a pair.
      draft_context: the drafter model reads only a prompt's last this-many tokens (None: all). Its
         prefill of a long prompt is a cost plain decoding never pays; proposals change, output not.
    Signals
      lambdas: weights of (entropy, logit margin, softmax margin) in C; normalised to sum 1.
      signal: which score drives the policies: the ensemble C or one signal alone (debugging).
      logit_scale: s in c_logit = 1 - exp(-(l1 - l2) / s); 2.0 maps a 2-nat logit gap to 0.63.
    """

    method: str = "cmasd"
    k: int = 4
    k_min: int = 1
    k_max: int = 8
    alpha: float = 1.0
    confidence_stop: float = 0.4
    entropy_threshold: float = 0.3
    heuristic_start: int = 5
    tau_base: float = 0.0
    gamma: float = 1.0
    beta: int = 3
    typical_eps: float = 0.09
    typical_delta: float = 0.3
    lambdas: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    signal: str = "ensemble"
    logit_scale: float = 2.0
    verify: str | None = None  # override the preset's verification rule (one of VERIFY_RULES)
    max_ngram: int = 3
    skip_entropy: float = 1.0
    draft_context: int | None = None

    def validate(self) -> "SpecConfig":
        _check(self.method in PRESETS,
               f"unknown method {self.method!r}; choose one of: {', '.join(PRESETS)}")
        for name in ("k", "k_min", "k_max", "heuristic_start", "beta", "max_ngram"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                   f"{name} must be an integer >= 1, got {v!r}")
        _check(self.draft_context is None or (isinstance(self.draft_context, int) and self.draft_context >= 1),
               f"draft_context must be a positive number of tokens or None, got {self.draft_context!r}")
        _check(self.k_min <= self.k_max, f"k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
        _check(self.k_max <= 64, f"k_max must be at most 64, got {self.k_max}")
        _check(self.k <= 64, f"k must be at most 64, got {self.k}")
        for name in ("alpha",):
            v = getattr(self, name)
            _check(0 < v <= 1, f"{name} must be in (0, 1], got {v!r}")
        for name in ("confidence_stop", "entropy_threshold", "tau_base", "typical_eps", "typical_delta",
                     "skip_entropy"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and 0 <= v <= 1, f"{name} must be in [0, 1], got {v!r}")
        _check(self.gamma >= 0, f"gamma must be >= 0, got {self.gamma!r}")
        _check(self.logit_scale > 0, f"logit_scale must be > 0, got {self.logit_scale!r}")
        _check(len(self.lambdas) == 3 and all(w >= 0 for w in self.lambdas) and sum(self.lambdas) > 0,
               f"lambdas must be three non-negative weights with a positive sum, got {self.lambdas!r}")
        _check(self.signal in SIGNALS, f"signal must be one of {SIGNALS}, got {self.signal!r}")
        _check(self.verify is None or self.verify in VERIFY_RULES,
               f"verify must be one of {VERIFY_RULES}, got {self.verify!r}")
        return self

    @property
    def length_policy(self) -> str:
        return PRESETS[self.method].length

    @property
    def verify_rule(self) -> str:
        return self.verify or PRESETS[self.method].verify

    @property
    def drafter_kind(self) -> str:
        return PRESETS[self.method].drafter

    @property
    def lossless(self) -> bool:
        """Whether this configuration reproduces the target exactly."""
        rule = self.verify_rule
        if rule == "exact":
            return True
        if rule in ("confidence-tau", "entropy-tau"):
            # tau_base = 0 switches the relaxed rule off: the loop then verifies exactly (decode.judge),
            # whatever beta is, so ties with the target's top token cannot slip in either.
            return self.tau_base == 0
        return False  # typical acceptance is lossy whatever its thresholds

    def with_(self, **changes) -> "SpecConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        _check(not unknown, f"unknown speculation option(s): {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(f.name for f in fields(self))}")
        return replace(self, **changes)


KNOBS = tuple(f.name for f in fields(SpecConfig))
SAMPLING_KNOBS = tuple(f.name for f in fields(SamplingConfig))


@dataclass(frozen=True)
class GenerationConfig:
    """One request: how many tokens, when to stop, how to sample, how to speculate."""

    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    trace: bool = False
    ignore_eos: bool = False

    def validate(self) -> "GenerationConfig":
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop strings must be non-empty strings, got {self.stop!r}")
        self.sampling.validate()
        self.spec.validate()
        return self
