"""Draft-length and verification-threshold policies."""

from adaspec.policies.length import (
    CMASDLength,
    ConfidenceStop,
    EntropyThreshold,
    FixedK,
    Heuristic,
    LengthPolicy,
    NoDraft,
    make_length_policy,
)
from adaspec.policies.threshold import confidence_tau, entropy_tau, taus_for

__all__ = [
    "CMASDLength", "ConfidenceStop", "EntropyThreshold", "FixedK", "Heuristic", "LengthPolicy",
    "NoDraft", "make_length_policy", "confidence_tau", "entropy_tau", "taus_for",
]
