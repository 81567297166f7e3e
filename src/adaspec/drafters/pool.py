"""A pool of drafters with different costs, one chosen per step.

Selection rule (documented in docs/method.md):
1. the free prompt-lookup drafter goes first: if the sequence's tail recurs earlier in the context
   with at least ``min_match`` tokens of continuation, its draft is used;
2. otherwise the model drafter is used, unless the recent steps show a high-entropy ("reasoning")
   regime in which the model drafter's expected accepted length does not pay for its cost; then
   the step drafts nothing and the target decodes one token (k = 0).

The regime is read from the model drafter's normalised entropy at its first draft token, averaged
over recent steps with an exponential moving average (``ema``). Whatever is chosen, verification is
unchanged, so lossless methods stay lossless under any selection sequence.
"""

from __future__ import annotations

import torch

from adaspec.config import SamplingConfig, SpecConfig
from adaspec.drafters.model import ModelDrafter
from adaspec.drafters.ngram import NGramDrafter
from adaspec.policies.length import LengthPolicy
from adaspec.records import Draft


class DrafterPool:
    name = "pool"

    def __init__(self, model: ModelDrafter | None, ngram: NGramDrafter | None = None, *, min_match: int = 1,
                 skip_entropy: float | None = None, ema: float = 0.5):
        if model is None and ngram is None:
            raise ValueError("a drafter pool needs at least one drafter")
        self.model, self.ngram = model, ngram
        self.vocab_size = (model or ngram).vocab_size
        self.min_match, self.skip_entropy, self.ema = min_match, skip_entropy, ema
        self.regime_entropy = 0.0  # EMA of the model drafter's first-token normalised entropy
        self.last_choice = "none"

    @property
    def forwards(self) -> int:
        return self.model.forwards if self.model is not None else 0

    @property
    def signal_s(self) -> float:
        return self.model.signal_s if self.model is not None else 0.0

    def begin(self, prompt: torch.Tensor) -> None:
        self.regime_entropy = 0.0
        for d in (self.model, self.ngram):
            if d is not None:
                d.begin(prompt)

    def propose(self, seq: torch.Tensor, max_k: int, policy: LengthPolicy, sampling: SamplingConfig,
                spec: SpecConfig, generator: torch.Generator | None) -> Draft:
        if self.ngram is not None:
            draft = self.ngram.propose(seq, max_k)
            if len(draft) >= self.min_match:
                return draft
        if self.model is None or (self.skip_entropy is not None and self.regime_entropy > self.skip_entropy):
            # Drafting is skipped this step, so the regime estimate would freeze; let it decay towards
            # routine so that the model drafter is tried again after a while.
            self.regime_entropy *= self.ema
            return Draft(tokens=seq.new_zeros(0), probs=None, signals=[], drafter="none")
        draft = self.model.propose(seq, max_k, policy, sampling, spec, generator)
        if draft.signals:
            h = float(draft.signals[0].entropy)
            self.regime_entropy = self.ema * self.regime_entropy + (1 - self.ema) * h
        return draft

    def commit(self, valid_len: int) -> None:
        for d in (self.model, self.ngram):
            if d is not None:
                d.commit(valid_len)
