"""Confidence signals of the drafter: pure batched functions over logits (..., V) -> (...).

Every signal lies in [0, 1] with 1 meaning "confident", so that they can be mixed:

- entropy confidence  c_ent   = 1 - H(p) / log V        (0 for uniform, 1 for one-hot)
- logit margin        c_logit = 1 - exp(-(l1 - l2) / s)  (l1, l2 the top-2 raw logits; s = logit_scale)
- softmax margin      c_soft  = p1 - p2                  (already in [0, 1])
- unified score       C = (l1 * c_ent + l2 * c_logit + l3 * c_soft) / (l1 + l2 + l3)

The logit margin is unbounded, so it is squashed with a saturating exponential rather than a
logistic: a zero gap maps to 0 (a tie carries no confidence), and the scale s says how many nats
of gap count as "fairly sure" (gap = s gives 0.63). Signals are read from the drafter's own
untempered distribution (temperature 1): they measure the model, not the sampling settings.
"""

from __future__ import annotations

import math

import torch

from adaspec.records import Signals


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of log-probabilities (..., V) -> (...)."""
    return -(logprobs.exp() * logprobs).sum(-1)


def signals_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor | None = None,
    *,
    lambdas: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    logit_scale: float = 2.0,
    signal: str = "ensemble",
    entropy_vocab: int | None = None,
) -> Signals:
    """All signals of logits (..., V) in one pass (one log-softmax, one top-2).

    tokens (...) are the drafted tokens whose probability is reported as ``p_token``;
    if None, the top-1 token is assumed (greedy drafting).
    entropy_vocab: normalise entropy by log(entropy_vocab) instead of log(V): a drafter over a
    pruned vocabulary (drafters/vocab.py) keeps the full vocabulary's scale.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logprobs = torch.log_softmax(logits, dim=-1)  # (..., V)
    vocab = entropy_vocab or logits.shape[-1]
    h_norm = (entropy(logprobs) / math.log(vocab)).clamp(0.0, 1.0)  # (...)
    top_logits, top_idx = logits.topk(2, dim=-1)  # (..., 2)
    top_p = logprobs.gather(-1, top_idx).exp()  # (..., 2)
    c_ent = 1.0 - h_norm
    c_logit = 1.0 - torch.exp(-(top_logits[..., 0] - top_logits[..., 1]) / logit_scale)
    c_soft = top_p[..., 0] - top_p[..., 1]
    if tokens is None:
        p_token = top_p[..., 0]
    else:
        p_token = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).exp()
    return Signals(
        entropy=h_norm,
        c_ent=c_ent,
        c_logit=c_logit,
        c_soft=c_soft,
        confidence=combine(c_ent, c_logit, c_soft, lambdas=lambdas, signal=signal),
        p_token=p_token,
    )


def combine(
    c_ent: torch.Tensor,
    c_logit: torch.Tensor,
    c_soft: torch.Tensor,
    *,
    lambdas: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    signal: str = "ensemble",
) -> torch.Tensor:
    """The unified confidence C: the lambda-weighted mean, or one signal alone for debugging."""
    if signal == "entropy":
        return c_ent
    if signal == "logit":
        return c_logit
    if signal == "soft":
        return c_soft
    w = torch.tensor(lambdas, dtype=c_ent.dtype, device=c_ent.device)
    w = w / w.sum()
    return w[0] * c_ent + w[1] * c_logit + w[2] * c_soft

