"""The draft head with prompt lookup beside it: each step copies the context's continuation when
that is expected to commit more tokens per unit of time than the head, and drafts with the head
otherwise (method ``head-lookup``).

Why: the head is cheap but accepted on 20-25% of tokens where an answer copies its prompt
(summaries, retrieval-augmented answers); there the continuation of the sequence's last n-gram in
its context is accepted far more often, at no drafting cost. The choice is the drafter pool's rule
(drafters/pool.py) with two options:

- lookup, when the last n-gram recurs: acceptance a_n, the discounted Beta estimate of n-gram
  matches of length n (priors pool.NGRAM_PRIOR), drafting cost 0, priced at its best length within
  the continuation;
- the head: acceptance a_h, a Beta estimate of the head's per-token acceptance with prior
  HEAD_PRIOR, drafting cost D = the head's measured price, priced at its best length up to max_k.

Each is priced by policies/cost.best_draft, expected committed tokens per unit of target time, on
the target's cost model T(n); the higher goodput runs. When the head runs, it drafts up to max_k
tokens under the method's length policy (its own probability of each token, policies/cost.py), as
in method ``head``: a_h only decides between the two. Verification is unchanged, so output is the
same as plain decoding (greedy) or the target's distribution (sampling: lookup drafts are one-hot).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adaspec.drafters.base import DraftContext
from adaspec.drafters.ngram import NGramDrafter
from adaspec.drafters.pool import FORGET, PRIOR_WEIGHT, Acceptance, ngram_prior
from adaspec.policies.cost import CostTable, best_draft
from adaspec.records import Draft

# Prior mean per-token acceptance of the head: the shipped head's held-out top-1 agreement with the
# target on its first drafted token (0.445, docs/method.md "Draft head"), rounded.
HEAD_PRIOR = 0.45


class HeadOrLookup:
    """Prompt lookup or the head, whichever has the higher expected goodput this step.

    head: a drafter with ``priced()`` (its cost per drafted token as a fraction of a one-token target
    forward), such as HeadDrafter; ngram: the prompt-lookup drafter; target_ms: n -> T(n). The engine
    builds one per request (Engine.drafter_for).
    """

    name = "head-lookup"

    def __init__(self, head, ngram: NGramDrafter, target_ms: Callable[[int], float], *,
                 head_prior: float = HEAD_PRIOR, prior_weight: float = PRIOR_WEIGHT, forget: float = FORGET):
        if head.vocab_size != ngram.vocab_size:
            raise ValueError(f"head and lookup disagree on the vocabulary size: {head.vocab_size}, {ngram.vocab_size}")
        self.head, self.ngram, self.target_ms = head, ngram, target_ms
        self.vocab_size = head.vocab_size
        self.head_prior, self.prior_weight, self.forget = head_prior, prior_weight, forget
        self._cost = CostTable(target_ms)
        self.chosen: dict[str, int] = {"head": 0, "lookup": 0}  # steps each option ran since built
        self.reset()

    def reset(self) -> None:
        """Back to the priors (every request starts here)."""
        self.rates: dict[str, Acceptance] = {}
        self._pending: tuple[str, int, int] | None = None  # (estimate key, committed length, k)

    # ---- what the engine reads of a drafter ------------------------------------------------------

    @property
    def forwards(self) -> int:
        return self.head.forwards

    @property
    def signal_s(self) -> float:
        return self.head.signal_s

    def priced(self) -> float:
        """The head's price: the method's length policy steers the head's drafts with it."""
        return self.head.priced()

    # ---- the choice ------------------------------------------------------------------------------

    def estimate(self, key: str) -> float:
        """Current acceptance estimate of "head" or "ngram:<n>"."""
        if key not in self.rates:
            prior = self.head_prior if key == "head" else ngram_prior(key)
            self.rates[key] = Acceptance(prior, self.prior_weight)
        return self.rates[key].mean

    def choose(self, seq: torch.Tensor, max_k: int) -> tuple[str, int, torch.Tensor]:
        """("lookup", k, continuation) or ("head", max_k, empty) for this step."""
        cont, n = self.ngram.lookup(seq, max_k)
        if not n:
            return "head", max_k, cont
        k, lookup_rate = best_draft(self.estimate(f"ngram:{n}"), 0.0, self._cost, len(cont))
        _, head_rate = best_draft(self.estimate("head"), self.priced() * self._cost(1), self._cost, max_k)
        if lookup_rate > head_rate:
            return f"ngram:{n}", k, cont[:k]
        return "head", max_k, cont[:0]

    # ---- the drafter protocol --------------------------------------------------------------------

    def begin(self, prompt: torch.Tensor) -> None:
        self.reset()
        self.head.begin(prompt)

    def propose(self, seq: torch.Tensor, max_k: int, ctx: DraftContext) -> Draft:
        if max_k <= 0:
            return Draft(tokens=seq.new_zeros(0), probs=None, signals=[], drafter="none")
        key, k, cont = self.choose(seq, max_k)
        if key == "head":
            draft = self.head.propose(seq, k, ctx)
            self.chosen["head"] += 1
        else:
            draft = self.ngram.draft(cont)
            self.chosen["lookup"] += 1
        self._pending = (key, int(seq.shape[0]), len(draft)) if len(draft) else None
        return draft

    def commit(self, valid_len: int) -> None:
        self.head.commit(valid_len)
        for rate in self.rates.values():
            rate.decay(self.forget)
        if self._pending is not None:
            (key, committed, k), self._pending = self._pending, None
            self.estimate(key)  # creates the estimate at its prior if this is its first outcome
            self.rates[key].observe(min(max(valid_len - committed, 0), k), k)
