"""Cost-aware draft length: draft while one more token is expected to raise the step's goodput.

With a_i the calibrated probability that d_i is accepted given d_1..d_{i-1} were, the chance that
the first j drafts are all accepted is P_j = a_1 * ... * a_j, and a step that drafts k tokens
commits 1 + P_1 + ... + P_k tokens in expectation (the accepted prefix plus one corrected or bonus
token). It costs k drafter forwards and one target forward over k + 1 new tokens, so

    goodput(k) = (1 + sum_{j<=k} P_j) / (k * D + T(k + 1))

with D the drafter's ms per token and T(n) the target's measured ms for n new tokens. After
drafting token j the policy knows P_1..P_j; the future a's are unknown, so it assumes the next
tokens are as likely to be accepted as the last one (P_{j+r} ~ P_j * a_j^r: confidence is
persistent over a few tokens) and keeps drafting while some longer draft, up to k_max, has a higher
expected goodput than stopping now. Looking ahead to every length, not just one more token, matters
when T(n) is a staircase (flat, then a jump, then flat again, as kernels tile).

Without a profile (uncalibrated) the acceptance probability is the drafter's unified confidence C
and the costs are FALLBACK_DRAFTER and FALLBACK_GROWTH below, in units of one target forward.
"""

from __future__ import annotations

from collections.abc import Callable

from adaspec.config import SpecConfig
from adaspec.policies.base import LengthPolicy
from adaspec.records import Signals

# Uncalibrated costs, relative to a one-token target forward: a drafter a quarter of the target's
# cost per token (a 0.5B drafter for a 1.5B target reads about a third of the weights), and a
# verification forward that grows 10% per extra token (int8 on CPU or any GPU at small k).
FALLBACK_DRAFTER = 0.25
FALLBACK_GROWTH = 0.10


def goodput(committed: float, k: int, drafter_ms: float, verify_ms: float) -> float:
    """Expected committed tokens per unit of cost of a step that drafts k tokens at drafter_ms each,
    verifies them in one target forward of verify_ms = T(k + 1), and commits `committed` tokens in
    expectation (1 + P_1 + ... + P_k)."""
    return committed / (k * drafter_ms + verify_ms)


def fallback_target_cost(n: int) -> float:
    """T(n) in units of one target forward when no cost model was measured."""
    return 1.0 + FALLBACK_GROWTH * (n - 1)


def best_draft(accept: float, drafter_ms: float, target_ms: Callable[[int], float], limit: int) -> tuple[int, float]:
    """(k, goodput(k)) for the draft length k in [1, limit] of highest expected goodput when every
    drafted token is accepted with probability `accept` independently (P_j = accept^j); ties go to
    the shorter draft. (0, -inf) when limit < 1."""
    best, best_rate = 0, float("-inf")
    p, total = 1.0, 0.0
    for k in range(1, limit + 1):
        p *= accept
        total += p
        rate = goodput(1.0 + total, k, drafter_ms, target_ms(k + 1))
        if rate > best_rate + 1e-12:
            best, best_rate = k, rate
    return best, best_rate


def best_draft_length(accept: float, drafter_ms: float, target_ms: Callable[[int], float], limit: int = 16) -> int:
    """The k of `best_draft` (at least 1)."""
    return max(best_draft(accept, drafter_ms, target_ms, limit)[0], 1)


def cost_table(target_ms: Callable[[int], float], n_max: int) -> list[float]:
    """[0, T(1), ..., T(n_max)]: the target's cost of 1..n_max new tokens, made non-decreasing
    (`monotone`) and indexed by n."""
    return [0.0] + monotone([float(target_ms(n)) for n in range(1, n_max + 1)])


class CostTable:
    """T(n) as `cost_table` makes it non-decreasing, extended on demand: callable as n -> T(n). Costs
    are computed up to n + `ahead` at once, so a step rarely extends the table."""

    def __init__(self, target_ms: Callable[[int], float], ahead: int = 8):
        self.target_ms, self.ahead = target_ms, ahead
        self._t: list[float] = [0.0]  # _t[n] = monotone T(n)

    def __call__(self, n: int) -> float:
        if n >= len(self._t):
            self._t = cost_table(self.target_ms, n + self.ahead)
        return self._t[n]


def monotone(costs: list[float]) -> list[float]:
    """Costs of forwards over 1, 2, ... tokens made non-decreasing (a running minimum from the right):
    a forward over n tokens can never cost more than one over m > n, so a measured dip past n (timing
    noise on a busy machine, a faster kernel tile) is what n tokens cost too."""
    out = list(costs)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


class CostAware(LengthPolicy):
    """Maximise expected committed tokens per unit time, token by token (see the module docstring).

    accept: signals of one drafted token -> a_i in [0, 1] (the calibrated acceptance model).
    drafter_ms: D, ms per drafter token. target_ms: n -> T(n), ms of a target forward over n tokens.
    """

    name = "cost-aware"

    def __init__(self, accept: Callable[[Signals], float], drafter_ms: float, target_ms: Callable[[int], float],
                 k_min: int, k_max: int):
        self.accept, self.drafter_ms, self.k_min, self.k_max = accept, drafter_ms, k_min, k_max
        self._t = cost_table(target_ms, k_max + 1)  # _t[n] = T(n)
        self._p, self._sum = 1.0, 0.0  # P_j and sum_{i<=j} P_i of the current draft

    def propose_length(self) -> int:
        self._p, self._sum = 1.0, 0.0
        return self.k_max

    def _rate(self, k: int, total: float) -> float:
        return goodput(1.0 + total, k, self.drafter_ms, self._t[k + 1])

    def keep_drafting(self, i: int, sig: Signals) -> bool:
        a = min(max(float(self.accept(sig)), 0.0), 1.0)  # host sync: one scalar per drafted token
        self._p *= a
        self._sum += self._p
        j = i + 1  # tokens drafted so far
        if j < self.k_min:
            return True
        now = self._rate(j, self._sum)
        p, total = self._p, self._sum
        for m in range(j + 1, self.k_max + 1):  # assume a_{j+1} = ... = a_m = a
            p *= a
            total += p
            if self._rate(m, total) > now:
                return True
        return False


def make_cost_aware(spec: SpecConfig, profile=None, drafter=None) -> CostAware:
    """The policy from a calibration profile, or on the documented fallbacks without one.

    A drafter that prices itself (`priced()`: its cost per drafted token as a fraction of a one-token
    target forward, measured once; the draft head) is steered by its own probability of each token
    it drafts as a_i, on the target's cost model from the profile (it does not depend on the
    drafter) or the fallback: a profile's acceptance model was fitted to another drafter's signals.
    A head trained by distillation on the target's distribution gives probabilities close to its
    acceptance (docs/method.md, "Draft head")."""
    spec = spec.resolved()
    priced = getattr(drafter, "priced", None)
    if callable(priced):
        target_ms = profile.cost.target_cost if profile is not None else fallback_target_cost
        return CostAware(lambda s: s.p_token, priced() * target_ms(1), target_ms, spec.k_min, spec.k_max)
    if profile is None:
        return CostAware(lambda s: s.confidence, FALLBACK_DRAFTER, fallback_target_cost,
                         spec.k_min, spec.k_max)
    model, cost = profile.acceptance, profile.cost
    drafter_ms = cost.drafter_ms_per_token if cost.drafter_ms_per_token is not None else 0.0
    return CostAware(lambda s: model.prob(s.c_ent, s.c_logit, s.c_soft), drafter_ms, cost.target_cost,
                     spec.k_min, spec.k_max)
