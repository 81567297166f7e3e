"""Verification-threshold policies: the gap bound tau_t for each draft token (relaxed rule only).

- exact:          tau_t = 0 (identical to greedy matching);
- confidence-tau: tau_t = tau_base * C_t ** gamma, CM-ASD's rule. At full confidence the bound is
  tau_base; as the drafter's confidence C_t drops it tightens towards 0, faster for larger gamma.
  The power form was chosen because it keeps tau_t in [0, tau_base], is monotone in C_t, and
  gamma = 0 recovers a fixed threshold;
- entropy-tau:    tau_t = tau_base in routine phases, 0 once the drafter's normalised entropy
  exceeds the entropy threshold: verification tightens during "reasoning".

A threshold policy is built once per request (`make_threshold_policy`) and maps a draft's signals
to its thresholds (k,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adaspec.config import SpecConfig
from adaspec.records import Signals

ThresholdPolicy = Callable[[list[Signals]], torch.Tensor]  # a draft's k signals -> taus (k,)


def confidence_tau(confidence: torch.Tensor, tau_base: float, gamma: float) -> torch.Tensor:
    """(k,) confidences in [0, 1] -> (k,) thresholds in [0, tau_base]."""
    return tau_base * confidence.clamp(0.0, 1.0).pow(gamma)


def entropy_tau(entropy: torch.Tensor, tau_base: float, threshold: float) -> torch.Tensor:
    """(k,) normalised entropies -> (k,) thresholds: tau_base below the threshold, 0 above."""
    return torch.where(entropy <= threshold, torch.full_like(entropy, tau_base), torch.zeros_like(entropy))


def make_threshold_policy(spec: SpecConfig) -> ThresholdPolicy:
    """The thresholds of a resolved spec's verification rule (zeros for the rules without tau)."""
    spec = spec.resolved()
    rule = spec.verify_rule

    def taus(signals: list[Signals]) -> torch.Tensor:
        if not signals:
            return torch.zeros(0)
        if rule == "confidence-tau":
            return confidence_tau(torch.stack([s.confidence for s in signals]), spec.tau_base, spec.gamma)
        if rule == "entropy-tau":
            return entropy_tau(torch.stack([s.entropy for s in signals]), spec.tau_base, spec.entropy_threshold)
        return torch.zeros(len(signals))

    return taus
