"""The draft-length policy protocol.

A policy is a small object with explicit state. The loop asks it for an upper bound once per step
(``propose_length``), the drafter asks it after each drafted token whether to draft another given
that token's signals (``keep_drafting``), and the loop reports the step's outcome (``update``).
Policies never touch a model or a shared config.

``keep_drafting`` reads a scalar signal on the host: that one sync per drafted token is deliberate,
since the decision to stop is made in Python before the next drafter forward.
"""

from __future__ import annotations

from adaspec.records import Signals, StepOutcome


class LengthPolicy:
    name = "base"

    def propose_length(self) -> int:
        """The most tokens this step may draft."""
        raise NotImplementedError

    def keep_drafting(self, i: int, sig: Signals) -> bool:
        """After drafting token i (0-based) with signals ``sig``: draft token i + 1 as well?"""
        return True

    def update(self, outcome: StepOutcome) -> None:
        pass
