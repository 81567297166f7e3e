"""Resolve a request's speculation once, before the loop: its knobs, its policies, its drafter.

    spec = resolve_knobs(cfg.spec, profile)       # explicit > profile (calibrated methods) > fallback
    plan = prepare(spec, drafter, profile)        # length policy, thresholds, rule, signal settings

`Engine.prepare` does both and picks the drafter the method names (api.py); the decode loop then
only runs the objects it is given.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from adaspec.config import VERIFY_RULES, SpecConfig
from adaspec.drafters.base import Drafter, SignalSettings
from adaspec.policies.base import LengthPolicy
from adaspec.policies.length import NoDraft, make_length_policy
from adaspec.policies.threshold import ThresholdPolicy, make_threshold_policy


@dataclass
class Speculation:
    """Everything the decode loop needs to speculate for one request, ready to run."""

    spec: SpecConfig  # the resolved knobs (no field left unset)
    drafter: Drafter | None  # None: plain decoding
    length: LengthPolicy
    thresholds: ThresholdPolicy  # a draft's signals -> taus (k,)
    rule: str  # the acceptance test of verify.py that runs: "exact" whenever the spec is lossless
    signals: SignalSettings

    @property
    def lossless(self) -> bool:
        return self.rule == "exact"


def resolve_knobs(spec: SpecConfig, profile=None, *, warn: bool = True) -> SpecConfig:
    """The knobs a request runs with. Calibrated methods take every knob the request leaves unset
    from the profile (calibration.profile.Profile.knobs); every other method ignores it. What is
    still unset gets its built-in fallback (config.knob)."""
    if not spec.calibrated:
        return spec.resolved()
    if profile is None:
        if warn:
            warnings.warn(f"method {spec.method!r} is running without a calibration profile, on built-in "
                          "fallbacks (docs/calibration.md); run `adaspec calibrate` for this pair and pass "
                          "--profile (or profile= to adaspec.load)", UserWarning, stacklevel=3)
        return spec.resolved()
    return spec.resolved(profile.knobs())


def prepare(spec: SpecConfig, drafter: Drafter | None, profile=None) -> Speculation:
    """The ready policies for a spec whose knobs `resolve_knobs` resolved (knobs still unset get
    their fallbacks) and a drafter; the length policy of `cost-aware` reads the profile's
    acceptance and cost models."""
    spec = spec.resolved()
    if spec.length_policy == "none":
        drafter = None
    rule = "exact" if spec.lossless else VERIFY_RULES[spec.verify_rule]
    return Speculation(spec=spec, drafter=drafter,
                       length=make_length_policy(spec, profile, drafter) if drafter is not None else NoDraft(),
                       thresholds=make_threshold_policy(spec), rule=rule,
                       signals=SignalSettings(spec.lambdas, spec.logit_scale, spec.signal))
