"""warp / greedy / sample: the one sampling path shared by drafter and target."""

import math

import pytest
import torch

from adaspec.config import SamplingConfig
from adaspec.sampling import greedy, make_generator, sample, sample_rows, warp


def S(**kw) -> SamplingConfig:
    return SamplingConfig(**{"temperature": 1.0, **kw})


def tv_bound(vocab: int, n: int, alpha: float = 1e-4) -> float:
    # Bretagnolle-Huber-Carol: P(TV(empirical, true) >= e) <= 2^V exp(-2 n e^2); solved for alpha.
    return math.sqrt((vocab * math.log(2) + math.log(1 / alpha)) / (2 * n))


# --- warp ---------------------------------------------------------------------------------------


def test_warp_plain_is_softmax_in_float32_or_float64():
    logits = torch.randn(3, 7, dtype=torch.float64)
    out = warp(logits, S())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, logits.softmax(-1))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert warp(logits.to(dtype), S()).dtype == torch.float32


def test_temperature_sharpens_and_keeps_order():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0], dtype=torch.float64)
    tops = [warp(logits, S(temperature=t)).max().item() for t in (2.0, 1.0, 0.5, 0.1)]
    assert tops == sorted(tops) and tops[-1] > 0.99
    torch.testing.assert_close(warp(logits, S(temperature=0.5)), (logits / 0.5).softmax(-1))
    assert torch.equal(warp(logits, S(temperature=0.3)).argsort(), logits.argsort())


def test_top_k_keeps_exactly_k_highest():
    logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0))  # (..., V) batch dims
    out = warp(logits, S(top_k=4))
    assert out.shape == logits.shape
    assert torch.equal((out > 0).sum(-1), torch.full((2, 3), 4))
    kept = (out > 0)
    threshold = logits.topk(4, dim=-1).values[..., -1:]  # (..., 1) 4th largest logit
    assert torch.equal(kept, logits >= threshold)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3))


def test_top_k_ties_go_to_lower_ids_and_large_k_is_a_no_op():
    out = warp(torch.zeros(5), S(top_k=2))
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))
    logits = torch.randn(6)
    torch.testing.assert_close(warp(logits, S(top_k=6)), logits.softmax(-1))
    torch.testing.assert_close(warp(logits, S(top_k=0)), logits.softmax(-1))


def test_top_p_keeps_the_minimal_nucleus():
    probs = torch.tensor([0.05, 0.3, 0.15, 0.5], dtype=torch.float64)  # ranked: 3, 1, 2, 0
    logits = probs.log()
    cases = {0.01: [3], 0.45: [3], 0.75: [3, 1], 0.81: [3, 1, 2], 0.96: [0, 1, 2, 3], 1.0: [0, 1, 2, 3]}
    for top_p, keep in cases.items():
        out = warp(logits, S(top_p=top_p))
        assert sorted(out.nonzero().flatten().tolist()) == sorted(keep), top_p
        torch.testing.assert_close(out[keep], probs[keep] / probs[keep].sum())


def test_top_p_applies_to_what_top_k_left():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log()
    # Alone, a 0.75 nucleus needs 3 tokens (0.4 + 0.3 < 0.75); after top-3 the mass is (4, 3, 2) / 9
    # and 4/9 + 3/9 = 0.78 >= 0.75 already.
    assert (warp(logits, S(top_p=0.75)) > 0).sum() == 3
    out = warp(logits, S(top_k=3, top_p=0.75))
    torch.testing.assert_close(out, torch.tensor([4 / 7, 3 / 7, 0, 0], dtype=torch.float64))


def test_warp_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        warp(torch.randn(4), SamplingConfig(temperature=0.0))
    with pytest.raises(ValueError, match="vocabulary"):
        warp(torch.tensor(1.0), S())
    with pytest.raises(ValueError, match="vocabulary"):
        warp(torch.zeros(3, 0), S())


# --- greedy / sample ----------------------------------------------------------------------------


def test_greedy_takes_the_first_of_tied_maxima():
    logits = torch.tensor([[1.0, 3.0, 3.0], [5.0, 5.0, 5.0]])
    assert greedy(logits).tolist() == [1, 0]
    assert greedy(logits[0]).dim() == 0


def test_sample_shapes_and_errors():
    probs = torch.tensor([0.2, 0.8])
    token = sample(probs, make_generator(0))
    assert token.dim() == 0 and token.dtype == torch.int64
    rows = sample_rows(probs.expand(5, 2), make_generator(0))
    assert rows.shape == (5,) and rows.dtype == torch.int64
    with pytest.raises(ValueError, match="sample_rows"):
        sample(probs.expand(3, 2))
    with pytest.raises(ValueError, match=r"\(n, V\)"):
        sample_rows(probs)


def test_sample_rows_follows_the_distribution_and_never_draws_zero_mass():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)
    n = 40_000
    draws = sample_rows(probs.expand(n, -1), make_generator(1))
    freq = torch.bincount(draws, minlength=7).double() / n
    assert freq[probs == 0].sum() == 0
    assert 0.5 * (freq - probs).abs().sum() < tv_bound(7, n)
    # Weights need not be normalised: the exponential race is scale-free.
    assert torch.equal(sample_rows(3 * probs.expand(n, -1), make_generator(1)), draws)


def test_generators_make_draws_reproducible():
    probs = torch.full((50, 6), 1 / 6)
    a = sample_rows(probs, make_generator(123))
    assert torch.equal(a, sample_rows(probs, make_generator(123)))
    assert not torch.equal(a, sample_rows(probs, make_generator(124)))
    g = make_generator(None, "cpu")
    assert g.device.type == "cpu"
    sample(probs[0], g)


def test_a_top_p_below_float32_resolution_keeps_the_top_token():
    logits = torch.tensor([[0.5, 3.0, 1.0], [2.0, 2.0, -1.0]])
    for top_p in (1e-300, 1e-45, 1e-12):  # 1e-300 and 1e-45 are 0 in float32
        p = warp(logits, S(top_p=top_p))
        assert not p.isnan().any()
        assert p.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # ties go to the lower id


def test_sampling_with_a_vanishing_top_p_is_greedy_end_to_end():
    from adaspec.api import Engine
    from adaspec.models.tiny import ByteTokenizer, tiny_model

    engine = Engine(tiny_model(seed=0), None, ByteTokenizer())
    greedy_ids = engine.generate([5, 6, 7], method="ar", max_new_tokens=12).token_ids
    sampled = engine.generate([5, 6, 7], method="ar", max_new_tokens=12, temperature=1.0, top_p=1e-300, seed=1)
    assert sampled.token_ids == greedy_ids
