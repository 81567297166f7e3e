"""Temperature, top-k and top-p warping and token sampling, shared by drafter and target.

Rejection sampling is lossless only with respect to the distributions it is given, so the
drafter's p and the target's q must be warped by this one function with the same settings:

    warp(l) = normalise(exp(l / T) restricted to the top-k tokens, then to the top-p nucleus)

- temperature T > 0 divides the logits (T = 0, greedy, never warps: see `greedy`);
- top-k keeps exactly the k highest logits (ties broken towards the lower token id);
- top-p, applied after top-k, keeps the smallest set of highest-probability tokens whose mass is
  >= top_p, and always at least the top token.

Sampling draws argmax(w / E) with E ~ Exp(1) i.i.d. per token (the exponential-race form of
inverse-CDF sampling, as in gpt-fast and vLLM): exact, and free of the host sync that
`torch.multinomial` performs on GPU, so the caller decides when to read the token back.
"""

from __future__ import annotations

import torch

from adaspec.config import SamplingConfig


def _float(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for softmax and cumulative sums; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def warp(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Logits (..., V) -> probabilities (..., V) after temperature, top-k and top-p."""
    if not s.temperature > 0:
        raise ValueError(f"warp needs temperature > 0, got {s.temperature!r}; "
                         "temperature 0 is greedy decoding: use greedy(logits)")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension (..., V) with V >= 1, "
                         f"got shape {tuple(logits.shape)}")
    x = _float(logits) / s.temperature  # (..., V)
    vocab = x.shape[-1]
    use_top_k = 0 < s.top_k < vocab
    use_top_p = s.top_p < 1
    if not (use_top_k or use_top_p):
        return x.softmax(-1)
    # A stable descending sort puts tied tokens in id order, so both filters cut ties reproducibly.
    ranked, order = torch.sort(x, dim=-1, descending=True, stable=True)  # (..., V)
    drop = torch.zeros_like(ranked, dtype=torch.bool)  # (..., V) in rank order
    if use_top_k:
        drop[..., s.top_k:] = True
        ranked = ranked.masked_fill(drop, float("-inf"))
    if use_top_p:
        probs = ranked.softmax(-1)  # (..., V) after top-k, as the nucleus is taken of what top-k left
        mass_before = probs.cumsum(-1) - probs  # (..., V) mass of the strictly higher-ranked tokens
        # A token stays while the tokens above it hold less than top_p. Rank 0 always stays, also when
        # top_p is too small for the tensor's dtype (1e-300 is 0 in float32): nothing left is NaN.
        drop |= mass_before >= s.top_p
        drop[..., 0] = False
    x = x.scatter(-1, order, ranked.masked_fill(drop, float("-inf")))  # back to token-id order
    return x.softmax(-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) -> argmax token ids (...), int64; ties go to the lowest id (torch.argmax)."""
    return logits.argmax(-1)


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Non-negative weights (..., V), not necessarily normalised -> token ids (...), int64."""
    w = _float(weights)
    noise = torch.empty_like(w).exponential_(generator=generator)  # (..., V)
    # An Exp(1) draw of exactly 0 would turn a zero-weight token into 0/0 = nan, which argmax picks.
    noise.clamp_min_(torch.finfo(w.dtype).tiny)
    return (w / noise).argmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token from probs (V,); returns a 0-d int64 tensor on probs' device (no host sync)."""
    if probs.dim() != 1:
        raise ValueError(f"sample takes one distribution of shape (V,), got {tuple(probs.shape)}; "
                         "use sample_rows for (n, V)")
    return _draw(probs, generator)


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token from each row of probs (n, V); returns (n,) int64 (no host sync)."""
    if probs.dim() != 2:
        raise ValueError(f"sample_rows takes distributions of shape (n, V), got {tuple(probs.shape)}")
    return _draw(probs, generator)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device`: seeded for reproducible runs, or from OS entropy when seed is None."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
