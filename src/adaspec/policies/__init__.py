"""Draft-length and verification-threshold policies."""

from adaspec.policies.base import LengthPolicy
from adaspec.policies.length import (
    CMASDLength,
    ConfidenceStop,
    EntropyThreshold,
    FixedK,
    Heuristic,
    NoDraft,
    make_length_policy,
)
from adaspec.policies.threshold import ThresholdPolicy, confidence_tau, entropy_tau, make_threshold_policy

__all__ = [
    "CMASDLength", "ConfidenceStop", "EntropyThreshold", "FixedK", "Heuristic", "LengthPolicy",
    "NoDraft", "ThresholdPolicy", "make_length_policy", "confidence_tau", "entropy_tau", "make_threshold_policy",
]
