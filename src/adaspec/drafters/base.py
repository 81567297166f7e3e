"""The drafter protocol: anything that proposes draft tokens for the committed sequence.

A drafter sees the committed sequence (prompt + generated tokens, a 1-D tensor) and proposes up
to ``max_k`` tokens, asking ``ctx.keep_drafting`` after each one. After verification the loop calls
``commit(valid_len)``: the first ``valid_len`` tokens of the committed sequence are final, and any
state the drafter keeps beyond that (a KV cache over rejected drafts) must be forgotten.

The loop reads two counters of every drafter for its statistics: ``forwards`` (model forwards
run) and ``signal_s`` (seconds spent computing signals and asking the policy, which the loop books
as overhead rather than drafting).

A drafter that runs a model may also offer ``steps(seq, max_k, ctx)``: the same proposal as a
generator that yields each forward it needs, ``(adapter, ids)``, receives that forward's logits
(n, V), and returns the Draft. `run_steps` runs it alone (what ``propose`` does); the batch
scheduler (batching.py) runs the forwards of many sequences' drafters as one batched forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Protocol

import torch

from adaspec.config import SamplingConfig
from adaspec.records import Draft, Signals
from adaspec.sampling import greedy, sample, warp
from adaspec.signals import signals_from_logits


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


DraftSteps = Generator[tuple[object, torch.Tensor], torch.Tensor, Draft]  # yields (adapter, ids), gets logits


def run_steps(steps: DraftSteps) -> Draft:
    """Run a drafter's steps alone: each forward on its own adapter (``adapter.extend(ids)``)."""
    try:
        adapter, ids = next(steps)
        while True:
            adapter, ids = steps.send(adapter.extend(ids))
    except StopIteration as done:
        return done.value


class DraftBuilder:
    """One proposal of a model-like drafter, token by token: each token picked from the drafter's
    logits (greedy, or sampled with its distribution kept), its signals, and the length policy's
    verdict on going on. Logits over a pruned vocabulary (N,) come with ``draft_ids``, the token id
    of each column; distributions are then spread back over the full vocabulary (zero elsewhere)."""

    def __init__(self, ctx: DraftContext, vocab_size: int, draft_ids: torch.Tensor | None = None):
        self.ctx, self.vocab_size, self.draft_ids = ctx, vocab_size, draft_ids
        self.tokens: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.signals: list[Signals] = []
        self.signal_s = 0.0  # seconds on signals and policy decisions

    def add(self, logits: torch.Tensor, max_k: int) -> tuple[torch.Tensor, bool]:
        """Pick the next token from logits (V,) or (N,); returns (token id, whether to draft another)."""
        ctx, i = self.ctx, len(self.tokens)
        if ctx.sampling.greedy:
            column = greedy(logits)  # 0-d
        else:
            p = warp(logits, ctx.sampling)
            column = sample(p, ctx.generator)
            self.probs.append(p if self.draft_ids is None else
                              torch.zeros(self.vocab_size, dtype=p.dtype, device=p.device).index_copy_(0, self.draft_ids, p))
        token = column if self.draft_ids is None else self.draft_ids[column]
        self.tokens.append(token)
        t0 = time.perf_counter()
        sig = signals_from_logits(logits, column, lambdas=ctx.signals.lambdas, logit_scale=ctx.signals.logit_scale,
                                  signal=ctx.signals.signal, entropy_vocab=self.vocab_size)
        self.signals.append(sig)
        keep = i + 1 < max_k and ctx.keep_drafting(i, sig)
        self.signal_s += time.perf_counter() - t0
        return token, keep

    def draft(self, device: torch.device, drafter: str) -> Draft:
        return Draft(
            tokens=torch.stack(self.tokens).to(device) if self.tokens else torch.zeros(0, dtype=torch.long, device=device),
            probs=torch.stack(self.probs) if self.probs else None,
            signals=self.signals,
            drafter=drafter,
        )
