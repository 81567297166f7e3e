"""The drafter protocol: anything that proposes draft tokens for the committed sequence.

A drafter sees the committed sequence (prompt + generated tokens, a 1-D tensor) and proposes up
to ``max_k`` tokens, asking ``ctx.keep_drafting`` after each one. After verification the loop calls
``commit(valid_len)``: the first ``valid_len`` tokens of the committed sequence are final, and any
state the drafter keeps beyond that (a KV cache over rejected drafts) must be forgotten.

The loop reads two counters of every drafter for its statistics: ``forwards`` (model forwards
run) and ``signal_s`` (seconds spent computing signals and asking the policy, which the loop books
as overhead rather than drafting).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from adaspec.config import SamplingConfig
from adaspec.records import Draft, Signals


@dataclass(frozen=True)
class SignalSettings:
    """How a drafter turns its logits into signals (signals.signals_from_logits)."""

    lambdas: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    logit_scale: float = 2.0
    signal: str = "ensemble"


@dataclass(frozen=True)
class DraftContext:
    """What a drafter needs besides the sequence, fixed for one request."""

    sampling: SamplingConfig
    generator: torch.Generator | None = None
    signals: SignalSettings = SignalSettings()
    keep_drafting: Callable[[int, Signals], bool] = lambda i, sig: True  # the length policy's per-token rule


class Drafter(Protocol):
    name: str
    vocab_size: int
    forwards: int  # model forwards run so far
    signal_s: float  # seconds spent on signals and policy decisions so far

    def begin(self, prompt: torch.Tensor) -> None:
        """Start a new sequence from prompt ids (T,)."""
        ...

    def propose(self, seq: torch.Tensor, max_k: int, ctx: DraftContext) -> Draft:
        """Propose at most max_k tokens to follow seq (L,)."""
        ...

    def commit(self, valid_len: int) -> None:
        """The first valid_len tokens of the sequence are final; forget anything past them."""
        ...
