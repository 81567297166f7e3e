"""A pool of drafters with different costs and accuracies; each step runs the one with the highest
expected goodput (committed tokens per unit of time), or none.

The options of a step are no draft, prompt lookup (free, only when the sequence's last n-gram
recurs) and each model drafter at its cost per drafted token. Each is priced at its best draft
length by policies/cost.best_draft under a per-token acceptance estimate, learned per request as a
Beta posterior with discounted evidence (`Acceptance`); prompt lookup keeps one estimate per
matched n-gram length. An entropy veto (`skip_entropy`) keeps the model drafters out of
"reasoning" regimes. docs/method.md ("Drafters") gives the formulas and the reason for every
constant below.

Whatever is chosen, verification is unchanged, so lossless methods stay lossless under any
selection sequence (tests/test_pool.py forces random choices through the ``select`` hook).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from adaspec.drafters.base import DraftContext, Drafter, DraftSteps, run_steps
from adaspec.drafters.ngram import NGramDrafter
from adaspec.policies.cost import CostTable, best_draft, fallback_target_cost
from adaspec.records import Draft

MODEL_PRIOR = 0.6  # prior mean acceptance of a model drafter without a profile
NGRAM_PRIOR = (0.25, 0.45, 0.65)  # prior mean acceptance of 1-, 2- and >= 3-token n-gram matches
PRIOR_WEIGHT = 4.0  # pseudo-tokens behind every prior
FORGET = 0.98  # per-step discount of the evidence (memory of about 50 steps)


def ngram_prior(key: str) -> float:
    """The prior mean acceptance of lookup estimate "ngram:<n>" (NGRAM_PRIOR, n >= 3 sharing the last)."""
    return NGRAM_PRIOR[min(int(key[6:]), len(NGRAM_PRIOR)) - 1]


@dataclass
class Acceptance:
    """Beta posterior over one per-token acceptance rate a, with discounted evidence: its mean is
    (w * a_0 + accepted) / (w + accepted + rejected), conjugate because a draft of k tokens
    accepted up to n has likelihood a^n (1 - a) when n < k and a^k when n == k."""

    prior: float  # prior mean a_0
    weight: float  # prior pseudo-tokens w
    accepted: float = 0.0  # discounted accepted draft tokens observed
    rejected: float = 0.0  # discounted rejections observed (at most one per step)

    @property
    def mean(self) -> float:
        return (self.weight * self.prior + self.accepted) / (self.weight + self.accepted + self.rejected)

    def observe(self, n_accepted: int, k: int) -> None:
        self.accepted += n_accepted
        self.rejected += float(n_accepted < k)

    def decay(self, forget: float) -> None:
        self.accepted *= forget
        self.rejected *= forget


@dataclass
class Option:
    """One way to run the next step, priced by expected goodput."""

    name: str  # drafter name recorded in Draft.drafter, or "none"
    key: str  # the acceptance estimate that prices it: a model drafter's name, "ngram:<n>", "" for none
    limit: int  # longest draft it can make this step (0 for none)
    k: int  # draft length maximising its expected goodput, 0 <= k <= limit
    a: float  # estimated per-token acceptance
    goodput: float  # expected committed tokens per unit of cost at k


@dataclass
class _Pending:
    key: str  # the estimate the step's outcome updates
    committed: int  # committed length L when the draft was proposed
    k: int  # draft length actually proposed


class DrafterPool:
    """Free prompt lookup plus any number of model drafters; each step the best expected goodput.

    models: (drafter, D) pairs, D its cost per drafted token in the units of target_ms.
    ngram: the prompt-lookup drafter, or None.
    target_ms: n -> T(n), a target forward over n new tokens; None = the uncalibrated fallback.
    priors: drafter name -> prior mean acceptance a_0 (default MODEL_PRIOR).
    skip_entropy, ema: the entropy veto on model drafters (None or 1.0 = never).
    select: test hook, options -> the option to run (its k may be changed, within its limit);
        None = the option with the highest goodput.
    """

    name = "pool"

    def __init__(self, models: Sequence[tuple[Drafter, float]], ngram: NGramDrafter | None = None,
                 target_ms: Callable[[int], float] | None = None, *, priors: Mapping[str, float] | None = None,
                 prior_weight: float = PRIOR_WEIGHT, forget: float = FORGET, skip_entropy: float | None = None,
                 ema: float = 0.5, select: Callable[[list[Option]], Option] | None = None):
        self.models = [(d, float(cost)) for d, cost in models]
        if not self.models and ngram is None:
            raise ValueError("a drafter pool needs at least one drafter")
        names = [d.name for d, _ in self.models]
        if len(set(names)) < len(names) or {"none", "ngram"} & set(names):
            raise ValueError(f"model drafters need distinct names other than 'none' and 'ngram', got {names}")
        vocab = {d.vocab_size for d, _ in self.models} | ({ngram.vocab_size} if ngram is not None else set())
        if len(vocab) > 1:
            raise ValueError(f"the pool's drafters disagree on the vocabulary size: {sorted(vocab)}")
        if not 0 < forget <= 1 or prior_weight <= 0:
            raise ValueError(f"need 0 < forget <= 1 and prior_weight > 0, got {forget}, {prior_weight}")
        self.ngram, self.vocab_size = ngram, vocab.pop()
        self.target_ms = target_ms or fallback_target_cost
        self.priors = dict(priors or {})
        self.prior_weight, self.forget, self.select = prior_weight, forget, select
        self.skip_entropy, self.ema = skip_entropy, ema
        self._cost = CostTable(self.target_ms)
        self.reset()

    def reset(self) -> None:
        """Forget everything learned: back to the priors (every request starts here)."""
        self.rates: dict[str, Acceptance] = {}
        self.regime_entropy = 0.0  # EMA of the model drafters' first-token normalised entropy
        self.last_options: list[Option] = []  # what the last step weighed (for tests and debugging)
        self._pending: _Pending | None = None

    @property
    def forwards(self) -> int:
        return sum(d.forwards for d, _ in self.models)

    @property
    def signal_s(self) -> float:
        return sum(d.signal_s for d, _ in self.models)

    def estimate(self, key: str) -> float:
        """The current acceptance estimate: a model drafter's name or "ngram:<n>"."""
        return self._rate(key).mean

    def _rate(self, key: str) -> Acceptance:
        if key not in self.rates:
            prior = ngram_prior(key) if key.startswith("ngram:") else self.priors.get(key, MODEL_PRIOR)
            self.rates[key] = Acceptance(prior, self.prior_weight)
        return self.rates[key]

    def _price(self, name: str, key: str, limit: int, drafter_cost: float) -> Option:
        """The option at its best draft length k in 1..limit."""
        a = self.estimate(key)
        k, rate = best_draft(a, drafter_cost, self._cost, limit)
        return Option(name, key, limit, k, a, rate)

    def options(self, seq: torch.Tensor, max_k: int) -> tuple[list[Option], torch.Tensor]:
        """Every option of this step, priced, and the lookup's continuation (empty without a match)."""
        opts = [Option("none", "", 0, 0, 0.0, 1.0 / self._cost(1))]
        cont, n = self.ngram.lookup(seq, max_k) if self.ngram is not None else (seq.new_zeros(0), 0)
        if n:
            opts.append(self._price(self.ngram.name, f"ngram:{n}", len(cont), 0.0))
        vetoed = self.skip_entropy is not None and self.regime_entropy > self.skip_entropy
        if max_k > 0 and not vetoed:
            opts += [self._price(d.name, d.name, max_k, cost) for d, cost in self.models]
        return opts, cont

    def begin(self, prompt: torch.Tensor) -> None:
        self.reset()
        for d in self._drafters():
            d.begin(prompt)

    def propose(self, seq: torch.Tensor, max_k: int, ctx: DraftContext) -> Draft:
        return run_steps(self.steps(seq, max_k, ctx))

    def steps(self, seq: torch.Tensor, max_k: int, ctx: DraftContext) -> DraftSteps:
        """`propose` one forward at a time (drafters/base.py): the chosen model drafter's forwards."""
        opts, cont = self.options(seq, max_k)
        self.last_options = opts
        choice = self.select(opts) if self.select is not None else max(opts, key=lambda o: o.goodput)
        k = min(max(choice.k, 0), choice.limit)
        if k and choice.name != "ngram":
            drafter = next(d for d, _ in self.models if d.name == choice.name)
            inner = getattr(drafter, "steps", None)
            draft = (yield from inner(seq, k, ctx)) if inner is not None else drafter.propose(seq, k, ctx)
            if draft.signals:
                h = float(draft.signals[0].entropy)  # host sync: one scalar per step
                self.regime_entropy = self.ema * self.regime_entropy + (1 - self.ema) * h
        else:
            # No model drafter runs, so the regime estimate would freeze; let it decay towards routine
            # so that a vetoed model drafter is considered again after a while.
            self.regime_entropy *= self.ema
            draft = self.ngram.draft(cont[:k]) if k else Draft(tokens=seq.new_zeros(0), probs=None, signals=[],
                                                               drafter="none")
        self._pending = _Pending(choice.key, int(seq.shape[0]), len(draft)) if len(draft) else None
        return draft

    def commit(self, valid_len: int) -> None:
        for d in self._drafters():
            d.commit(valid_len)
        for rate in self.rates.values():
            rate.decay(self.forget)
        if self._pending is not None:
            p, self._pending = self._pending, None
            self._rate(p.key).observe(min(max(valid_len - p.committed, 0), p.k), p.k)

    def _drafters(self) -> list:
        return [d for d, _ in self.models] + ([self.ngram] if self.ngram is not None else [])
