"""Typed records passed between the stages of one speculative step.

Vocabulary used throughout adaspec (defined once, here):

- *draft tokens* d_1..d_k are proposed by the drafter, whose distributions are p_1..p_k;
- the target scores the k drafts plus one more position in a single forward, giving q_0..q_k
  (q_i is the target's distribution for the position of d_{i+1}; q_k is the position after d_k);
- an *accepted* token is a draft token the verification rule keeps; acceptance stops at the
  first rejection, so a step accepts a prefix d_1..d_n (0 <= n <= k);
- the *corrected* token replaces the first rejected draft (n < k) and is drawn from the target;
- the *bonus* token is drawn from q_k when every draft was accepted (n == k).

Every step therefore commits n + 1 tokens: the accepted prefix and one corrected or bonus token.
Plain autoregressive decoding is the k = 0 case (no drafts, one bonus token per step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from adaspec.config import SpecConfig


@dataclass
class Signals:
    """The drafter's uncertainty at one or more positions, each in [0, 1] (1 = confident).

    All fields share one shape (...) - a scalar for one token, (k,) for a whole draft.
    """

    entropy: torch.Tensor  # (...) normalised entropy H / log V (0 = one-hot, 1 = uniform)
    c_ent: torch.Tensor  # (...) entropy confidence 1 - H / log V
    c_logit: torch.Tensor  # (...) squashed top-1 minus top-2 logit
    c_soft: torch.Tensor  # (...) softmax margin p1 - p2
    confidence: torch.Tensor  # (...) unified score C = sum_i lambda_i * c_i
    p_token: torch.Tensor  # (...) drafter probability of the token it proposed


@dataclass
class Draft:
    """What a drafter proposes in one step."""

    tokens: torch.Tensor  # (k,) int64 draft token ids d_1..d_k
    probs: torch.Tensor | None  # (k, V) drafter distributions p_i it sampled from; None = greedy/one-hot
    signals: list[Signals]  # k entries, one per draft token (scalars), for policies and traces
    drafter: str = "model"  # name of the drafter that made it (several drafters may share a step loop)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Verdict:
    """What a verification rule decides about a draft."""

    n_accepted: int  # length n of the accepted prefix, 0 <= n <= k
    next_token: int  # corrected token (n < k) or bonus token (n == k)
    accepted_mask: list[bool] = field(default_factory=list)  # per draft token, for traces


@dataclass
class StepOutcome:
    """What a policy learns after a step (its `update` input)."""

    k: int  # draft length used
    n_accepted: int  # accepted prefix length
    signals: list[Signals]  # per drafted token


@dataclass
class TraceStep:
    """One step of a per-token trace (requested with ``trace=True``)."""

    k: int
    drafter: str
    tokens: list[int]  # draft tokens
    entropy: list[float]
    c_ent: list[float]
    c_logit: list[float]
    c_soft: list[float]
    confidence: list[float]
    tau: list[float]  # verification threshold used per draft token (0 = exact)
    accepted: list[bool]
    next_token: int
    wall_s: float


@dataclass
class Stats:
    """Counters and timings of one generation."""

    new_tokens: int = 0
    target_forwards: int = 0
    drafter_forwards: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    rollbacks: int = 0  # steps in which at least one draft token was rejected
    prefill_s: float = 0.0
    first_token_s: float = 0.0  # from the start (prefill included) to the first committed tokens
    draft_s: float = 0.0
    target_s: float = 0.0  # the target's forwards (scoring drafts), prefill excluded
    policy_s: float = 0.0  # signals, policy and verification-rule bookkeeping outside model forwards
    total_s: float = 0.0
    drafters_used: dict[str, int] = field(default_factory=dict)  # steps per drafter name

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens committed per target forward (accepted + corrected/bonus)."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second, end to end (prefill of both models included), as Spec-Bench times it."""
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second of the decode loop alone (prefill excluded)."""
        decode_s = self.total_s - self.prefill_s
        return self.new_tokens / decode_s if decode_s > 0 else 0.0

    @property
    def rollback_rate(self) -> float:
        return self.rollbacks / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted=self.mean_accepted,
            tokens_per_s=self.tokens_per_s,
            decode_tokens_per_s=self.decode_tokens_per_s,
            rollback_rate=self.rollback_rate,
        )
        return d


@dataclass
class Result:
    """The outcome of one generation."""

    token_ids: list[int]  # new tokens only (prompt excluded), stop string / EOS included
    text: str | None  # decoded new text (stop string removed) if a tokenizer was available
    finish_reason: str  # "length" | "eos" | "stop"
    method: str
    lossless: bool  # True when the output follows the target exactly (greedy or rejection sampling)
    stats: Stats
    trace: list[TraceStep] | None = None
    prompt_tokens: int = 0
    spec: SpecConfig | None = None  # the knobs it ran with, resolved (explicit, profile or fallback)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "method": self.method,
            "lossless": self.lossless,
            "prompt_tokens": self.prompt_tokens,
            "stats": self.stats.to_dict(),
            "spec": asdict(self.spec) if self.spec is not None else None,
            "trace": [asdict(t) for t in self.trace] if self.trace is not None else None,
        }
