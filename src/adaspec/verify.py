"""Verification rules: which draft tokens to keep, and the corrected or bonus token.

Every rule has one contract. It is given the draft tokens d_1..d_k (k,), the target's raw logits
for q_0..q_k (k+1, V), and, where it needs them, the drafter's distributions p_1..p_k (k, V), its
thresholds and a `torch.Generator`. It returns a `Verdict`: the accepted prefix length n, the
corrected token (n < k, drawn at position n) or the bonus token (n == k, drawn from q_k), and a
per-draft acceptance mask. k = 0 is plain decoding: one token drawn from q_0. (Accepted,
corrected and bonus tokens are defined in `adaspec.records`.)

Lossless rules (the output follows the target exactly):

- greedy_match (temperature 0): accept d_i while d_i == argmax q_{i-1}; next = argmax q_n.
- rejection_sample (temperature > 0; Leviathan et al. 2023, Chen et al. 2023): with q = warp(l),
  accept d_i with probability min(1, q_{i-1}(d_i) / p_i(d_i)); at the first rejection draw the
  correction from normalise(max(0, q_{i-1} - p_i)), the bonus from q_k. A deterministic drafter
  (p = None) has p_i = one-hot(d_i). At temperature 0, q is one-hot on the argmax and the rule
  reduces to greedy_match.

Lossy rules (they accept some tokens the target would not have produced; deterministic tests):

- typical_accept (Medusa, Cai et al. 2024): accept d_i if q(d_i) > min(eps, delta * exp(-H(q))),
  q = q_{i-1}, H in nats. At T > 0, q is the warped target distribution we sample from; at T = 0
  q is the untempered softmax (T = 1), since a one-hot q has H = 0 and the rule would degenerate
  to greedy matching. The argmax is always accepted (the formula implies it whenever delta < 1,
  as exp(-H) <= max q), so the rule is never stricter than greedy.
- relaxed_accept (CM-ASD): accept d_i if d_i == argmax q_{i-1}, or if rank(d_i) < beta and
  max q_{i-1} - q_{i-1}(d_i) <= tau_i. The gap is always measured on softmax(l) at T = 1, so a
  threshold means the same thing whatever the sampling temperature; ranks break ties like argmax
  (lower id first), so tau = 0 and beta = 1 is exactly greedy_match. Lossy when tau > 0 or beta > 1.

For both lossy rules the corrected / bonus token is argmax q_n at T = 0 and a draw from
warp(l_n) at T > 0.

No rule reads a tensor back to the host except once, when it builds the Verdict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaspec.config import VERIFY_RULES, SamplingConfig
from adaspec.records import Verdict
from adaspec.sampling import greedy, sample, sample_rows, warp

ACCEPTANCE = tuple(dict.fromkeys(VERIFY_RULES.values()))  # ("exact", "relaxed", "typical")


def _check_shapes(tokens: torch.Tensor, p: torch.Tensor | None, target_logits: torch.Tensor) -> tuple[int, int]:
    """Validate the shared contract; returns (k, V)."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be the draft d_1..d_k of shape (k,), got {tuple(tokens.shape)}")
    if tokens.numel() and tokens.is_floating_point():
        raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    k = tokens.shape[0]
    if target_logits.dim() != 2 or target_logits.shape[0] != k + 1 or target_logits.shape[1] < 1:
        raise ValueError(f"target_logits must have shape (k+1, V) = ({k + 1}, V) for k = {k} draft tokens "
                         f"(q_0..q_k), got {tuple(target_logits.shape)}")
    vocab = target_logits.shape[1]
    if p is not None and tuple(p.shape) != (k, vocab):
        raise ValueError(f"p must have shape (k, V) = ({k}, {vocab}) (p_1..p_k), got {tuple(p.shape)}")
    return k, vocab


def _n_accepted(accept: torch.Tensor) -> torch.Tensor:
    """Per-draft accept flags (..., k) -> length of the accepted prefix (...), int64."""
    return accept.long().cumprod(-1).sum(-1)


def _row(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Row n of x (R, V) as (V,), with n a 0-d tensor: index_select does not read n back to the host."""
    return x.index_select(0, n.reshape(1)).squeeze(0)


def _next_token(target_logits: torch.Tensor, n: torch.Tensor, sampling: SamplingConfig,
                generator: torch.Generator | None) -> torch.Tensor:
    """Corrected (n < k) or bonus (n == k) token of a deterministic rule, drawn from q_n; 0-d."""
    logits = _row(target_logits, n)  # (V,)
    return greedy(logits) if sampling.greedy else sample(warp(logits, sampling), generator)


def _verdict(n: torch.Tensor, next_token: torch.Tensor, k: int) -> Verdict:
    # The rule's one host sync: the decode loop needs n and the next token as Python ints.
    n_accepted, token = torch.stack([n.long(), next_token.long()]).tolist()
    return Verdict(n_accepted, token, [i < n_accepted for i in range(k)])


def greedy_match(tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Lossless at temperature 0: accept d_i while d_i == argmax q_{i-1}.

    tokens (k,) int64; target_logits (k+1, V).
    """
    k, _ = _check_shapes(tokens, None, target_logits)
    top = greedy(target_logits)  # (k+1,)
    n = _n_accepted(tokens.to(top) == top[:k])  # 0-d
    return _verdict(n, top.gather(0, n.reshape(1)).squeeze(0), k)


def _target_probs(target_logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """q (k+1, V): warp at T > 0; at T = 0 the one-hot argmax, the limit of warp as T -> 0."""
    if sampling.greedy:
        logits = target_logits if target_logits.dtype == torch.float64 else target_logits.float()
        return F.one_hot(greedy(logits), logits.shape[-1]).to(logits.dtype)
    return warp(target_logits, sampling)


def _rejection(tokens: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection-sampling step over any leading batch dims (...).

    tokens (..., k) int64; p (..., k, V) and q (..., k+1, V) of one float dtype.
    Returns n (...) and the corrected / bonus token (...), both int64 tensors.
    """
    k, vocab = tokens.shape[-1], q.shape[-1]
    d = tokens.unsqueeze(-1)  # (..., k, 1)
    p_d = p.gather(-1, d).squeeze(-1)  # (..., k)
    q_d = q[..., :k, :].gather(-1, d).squeeze(-1)  # (..., k)
    u = torch.rand(p_d.shape, dtype=q.dtype, device=q.device, generator=generator)  # (..., k)
    # u < q/p written without the division, so p(d) = 0 (a token the drafter could not draw) is safe.
    n = _n_accepted(u * p_d < q_d)  # (...)
    # A zero row after p_k makes the bonus the same formula: max(0, q_k - 0) = q_k.
    p_pad = torch.cat([p, torch.zeros_like(q[..., :1, :])], dim=-2)  # (..., k+1, V)
    at_n = n[..., None, None].expand(*n.shape, 1, vocab)  # (..., 1, V)
    q_n = q.gather(-2, at_n).squeeze(-2)  # (..., V)
    residual = (q_n - p_pad.gather(-2, at_n).squeeze(-2)).clamp_min(0)  # (..., V)
    # Residual mass is the rejection probability: below float eps it is rounding noise (p == q), so
    # fall back to q; the bias this allows is at most eps in total variation.
    real = residual.sum(-1, keepdim=True) > torch.finfo(q.dtype).eps  # (..., 1)
    residual = torch.where(real, residual, q_n)  # (..., V)
    token = sample_rows(residual.reshape(-1, vocab), generator).reshape(n.shape)  # (...)
    return n, token


def rejection_sample(tokens: torch.Tensor, p: torch.Tensor | None, target_logits: torch.Tensor,
                     sampling: SamplingConfig, generator: torch.Generator | None = None) -> Verdict:
    """Lossless speculative sampling: the committed tokens follow warp(target) exactly.

    tokens (k,) int64 drawn from p; p (k, V) the drafter's warped distributions, or None for a
    deterministic drafter (one-hot on tokens); target_logits (k+1, V) raw logits of q_0..q_k.
    """
    k, vocab = _check_shapes(tokens, p, target_logits)
    q = _target_probs(target_logits, sampling)  # (k+1, V)
    tokens = tokens.to(device=q.device, dtype=torch.long)
    if p is None:
        p = F.one_hot(tokens, vocab).to(q.dtype)  # (k, V)
    dtype = torch.promote_types(p.dtype, q.dtype)
    n, token = _rejection(tokens, p.to(dtype), q.to(dtype), generator)
    return _verdict(n, token, k)


def typical_accept(tokens: torch.Tensor, target_logits: torch.Tensor, sampling: SamplingConfig,
                   eps: float = 0.09, delta: float = 0.3,
                   generator: torch.Generator | None = None) -> Verdict:
    """Medusa's typical acceptance (lossy): accept d_i if q(d_i) > min(eps, delta * exp(-H(q))).

    tokens (k,) int64; target_logits (k+1, V). q is warp(l) at T > 0 and softmax(l) at T = 0.
    """
    k, _ = _check_shapes(tokens, None, target_logits)
    logits = target_logits[:k]  # (k, V)
    tokens = tokens.to(device=logits.device, dtype=torch.long)
    if sampling.greedy:
        q = (logits if logits.dtype == torch.float64 else logits.float()).softmax(-1)  # (k, V)
    else:
        q = warp(logits, sampling)  # (k, V)
    entropy = -torch.special.xlogy(q, q).sum(-1)  # (k,) nats; xlogy makes 0 log 0 = 0 for cut tokens
    threshold = (delta * torch.exp(-entropy)).clamp_max(eps)  # (k,)
    q_d = q.gather(-1, tokens[:, None]).squeeze(-1)  # (k,)
    n = _n_accepted((q_d > threshold) | (tokens == greedy(logits)))
    return _verdict(n, _next_token(target_logits, n, sampling, generator), k)


def relaxed_accept(tokens: torch.Tensor, target_logits: torch.Tensor, taus: torch.Tensor | float, beta: int,
                   sampling: SamplingConfig, generator: torch.Generator | None = None) -> Verdict:
    """CM-ASD relaxed acceptance (lossy when tau > 0 or beta > 1): accept d_i if it is the argmax,
    or if it ranks below beta and its probability is within tau_i of the top one.

    tokens (k,) int64; target_logits (k+1, V); taus (k,) gap bounds in [0, 1] (a float applies to
    every position); beta >= 1.
    """
    k, vocab = _check_shapes(tokens, None, target_logits)
    if isinstance(beta, bool) or not isinstance(beta, int) or beta < 1:
        raise ValueError(f"beta must be an integer >= 1, got {beta!r}")
    logits = target_logits[:k]  # (k, V)
    taus = torch.as_tensor(taus, device=logits.device)
    if taus.dim() == 0:
        taus = taus.expand(k)
    if tuple(taus.shape) != (k,):
        raise ValueError(f"taus must have shape (k,) = ({k},), got {tuple(taus.shape)}")
    tokens = tokens.to(device=logits.device, dtype=torch.long)
    d = tokens[:, None]  # (k, 1)
    l_d = logits.gather(-1, d)  # (k, 1)
    # Rank with argmax's tie-break (lower id first) so that rank 0 is exactly greedy's token.
    lower_id = torch.arange(vocab, device=logits.device) < d  # (k, V)
    rank = ((logits > l_d) | ((logits == l_d) & lower_id)).sum(-1)  # (k,)
    q = (logits if logits.dtype == torch.float64 else logits.float()).softmax(-1)  # (k, V) at T = 1
    gap = q.max(-1).values - q.gather(-1, d).squeeze(-1)  # (k,)
    accept = (tokens == greedy(logits)) | ((rank < beta) & (gap <= taus))
    n = _n_accepted(accept)
    return _verdict(n, _next_token(target_logits, n, sampling, generator), k)


def verify(rule: str, tokens: torch.Tensor, p: torch.Tensor | None, target_logits: torch.Tensor, *,
           sampling: SamplingConfig, taus: torch.Tensor | float | None = None, beta: int = 1,
           eps: float = 0.09, delta: float = 0.3, generator: torch.Generator | None = None) -> Verdict:
    """Apply the acceptance test `rule` ("exact", "relaxed" or "typical"; config.VERIFY_RULES maps the
    `verify` knob's rule names to these) to one draft.

    "exact" is greedy_match at temperature 0 and rejection_sample above it (both lossless).
    "relaxed" uses taus (k,) (None = all zeros, i.e. exact greedy) and beta; "typical" uses eps and
    delta. p (k, V) is read only by rejection sampling but always shape-checked.
    """
    if rule not in ACCEPTANCE:
        raise ValueError(f"unknown verification rule {rule!r}; choose one of: {', '.join(ACCEPTANCE)}")
    k, _ = _check_shapes(tokens, p, target_logits)
    if rule == "exact":
        if sampling.greedy:
            return greedy_match(tokens, target_logits)
        return rejection_sample(tokens, p, target_logits, sampling, generator)
    if rule == "relaxed":
        return relaxed_accept(tokens, target_logits, 0.0 if taus is None else taus, beta, sampling, generator)
    return typical_accept(tokens, target_logits, sampling, eps, delta, generator)
