"""Draft-length policies: how many tokens to speculate in a step (the protocol is policies/base.py)."""

from __future__ import annotations

import math

from adaspec.config import SpecConfig
from adaspec.policies.base import LengthPolicy
from adaspec.policies.cost import make_cost_aware
from adaspec.records import Signals, StepOutcome


class NoDraft(LengthPolicy):
    """Plain autoregressive decoding through the same engine: k = 0 every step."""

    name = "none"

    def propose_length(self) -> int:
        return 0


class FixedK(LengthPolicy):
    """Always draft exactly k tokens (the classic speculative decoding baseline)."""

    name = "fixed"

    def __init__(self, k: int):
        self.k = k

    def propose_length(self) -> int:
        return self.k


class Heuristic(LengthPolicy):
    """transformers' "heuristic" schedule: k += 2 after a fully accepted draft, k -= 1 otherwise.

    transformers leaves k unbounded above; here it is kept in [1, k_max] so that one lucky streak
    cannot make a verification forward arbitrarily expensive.
    """

    name = "heuristic"

    def __init__(self, start: int, k_max: int):
        self.start, self.k_max = start, k_max
        self.k = start

    def propose_length(self) -> int:
        return self.k

    def update(self, outcome: StepOutcome) -> None:
        if outcome.k == 0:
            return
        if outcome.n_accepted == outcome.k:
            self.k = min(self.k + 2, self.k_max)
        else:
            self.k = max(self.k - 1, 1)


class ConfidenceStop(LengthPolicy):
    """Stop drafting once the drafter's probability of its own token falls below a threshold.

    This is transformers' ``assistant_confidence_threshold`` and llama.cpp's ``--draft-p-min``.
    The token that fell below the threshold is still proposed (it may yet be accepted); drafting
    stops after it.
    """

    name = "confidence-stop"

    def __init__(self, threshold: float, k_min: int, k_max: int):
        self.threshold, self.k_min, self.k_max = threshold, k_min, k_max

    def propose_length(self) -> int:
        return self.k_max

    def keep_drafting(self, i: int, sig: Signals) -> bool:
        return i + 1 < self.k_min or float(sig.p_token) >= self.threshold


class CMASDLength(LengthPolicy):
    """CM-ASD adaptive draft length, decided token by token as confidence arrives.

    After drafting token i, the allowed length is

        k_allowed = k_min + round(alpha * C_min * (k_max - k_min))

    where C_min is the lowest unified confidence C seen so far in this draft. The minimum, not the
    mean, is used because a draft token can only be accepted if every token before it was: the
    weakest token bounds how far acceptance can reach. Full confidence with alpha = 1 opens the
    whole range up to k_max; alpha < 1 makes the policy less optimistic.
    """

    name = "cmasd"

    def __init__(self, k_min: int, k_max: int, alpha: float):
        self.k_min, self.k_max, self.alpha = k_min, k_max, alpha
        self._c_min = 1.0

    def propose_length(self) -> int:
        self._c_min = 1.0
        return self.k_max

    def allowed(self, c_min: float) -> int:
        return self.k_min + math.floor(self.alpha * c_min * (self.k_max - self.k_min) + 0.5)

    def keep_drafting(self, i: int, sig: Signals) -> bool:
        self._c_min = min(self._c_min, float(sig.confidence))
        return i + 1 < self.allowed(self._c_min)


class EntropyThreshold(LengthPolicy):
    """The entropy-aware rule: stop drafting when the drafter enters a high-entropy ("reasoning")
    phase, i.e. when its normalised entropy H / log V exceeds the threshold."""

    name = "entropy"

    def __init__(self, threshold: float, k_min: int, k_max: int):
        self.threshold, self.k_min, self.k_max = threshold, k_min, k_max

    def propose_length(self) -> int:
        return self.k_max

    def keep_drafting(self, i: int, sig: Signals) -> bool:
        return i + 1 < self.k_min or float(sig.entropy) <= self.threshold


def make_length_policy(spec: SpecConfig, profile=None, drafter=None) -> LengthPolicy:
    """The policy a resolved spec names; `cost-aware` reads a calibration profile
    (calibration.profile.Profile), or falls back to its documented defaults when there is none, and
    a drafter that prices itself (the draft head) steers it with its own probabilities."""
    spec = spec.resolved()  # knobs still unset get their fallbacks
    kind = spec.length_policy
    if kind == "none":
        return NoDraft()
    if kind == "fixed":
        return FixedK(spec.k)
    if kind == "heuristic":
        return Heuristic(spec.heuristic_start, spec.k_max)
    if kind == "confidence-stop":
        return ConfidenceStop(spec.confidence_stop, spec.k_min, spec.k_max)
    if kind == "cmasd":
        return CMASDLength(spec.k_min, spec.k_max, spec.alpha)
    if kind == "entropy":
        return EntropyThreshold(spec.entropy_threshold, spec.k_min, spec.k_max)
    if kind == "cost-aware":
        return make_cost_aware(spec, profile, drafter)
    raise ValueError(f"unknown length policy {kind!r}")
