import math

import pytest
import torch

from adaspec.signals import combine, entropy, signals_from_logits


def test_uniform_logits_have_zero_confidence():
    s = signals_from_logits(torch.zeros(10))
    assert s.entropy.item() == pytest.approx(1.0)
    assert s.c_ent.item() == pytest.approx(0.0, abs=1e-6)
    assert s.c_logit.item() == pytest.approx(0.0)
    assert s.c_soft.item() == pytest.approx(0.0)
    assert s.confidence.item() == pytest.approx(0.0, abs=1e-6)


def test_peaked_logits_are_confident():
    logits = torch.tensor([30.0, 0.0, 0.0, 0.0])
    s = signals_from_logits(logits)
    assert s.c_ent.item() > 0.99
    assert s.c_logit.item() == pytest.approx(1 - math.exp(-15.0))
    assert s.c_soft.item() == pytest.approx(1.0, abs=1e-6)
    assert s.p_token.item() == pytest.approx(1.0, abs=1e-6)


def test_hand_computed_values():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    s = signals_from_logits(p.log(), lambdas=(1.0, 1.0, 2.0), logit_scale=2.0)
    h = -(p * p.log()).sum().item()
    assert s.entropy.item() == pytest.approx(h / math.log(3))
    assert s.c_soft.item() == pytest.approx(0.5)
    gap = math.log(0.7) - math.log(0.2)
    assert s.c_logit.item() == pytest.approx(1 - math.exp(-gap / 2.0))
    expected = (s.c_ent + s.c_logit + 2 * s.c_soft).item() / 4
    assert s.confidence.item() == pytest.approx(expected)


def test_batched_shapes_and_token_probability():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    tokens = torch.randint(0, 11, (3, 5))
    s = signals_from_logits(logits, tokens)
    for v in (s.entropy, s.c_ent, s.c_logit, s.c_soft, s.confidence, s.p_token):
        assert v.shape == (3, 5)
        assert ((v >= 0) & (v <= 1)).all()
    expected = torch.softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(s.p_token, expected)


@pytest.mark.parametrize("signal,field", [("entropy", "c_ent"), ("logit", "c_logit"), ("soft", "c_soft")])
def test_single_signal_mode(signal, field):
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    s = signals_from_logits(logits, signal=signal)
    assert s.confidence.item() == pytest.approx(getattr(s, field).item())


def test_weights_are_normalised():
    a, b, c = torch.tensor(0.2), torch.tensor(0.6), torch.tensor(1.0)
    assert combine(a, b, c, lambdas=(2, 2, 2)).item() == pytest.approx(0.6)
    assert combine(a, b, c, lambdas=(0, 0, 5)).item() == pytest.approx(1.0)


def test_entropy_and_batched_signals():
    lp = torch.log(torch.tensor([0.5, 0.5]))
    assert entropy(lp).item() == pytest.approx(math.log(2))
    st = signals_from_logits(torch.randn(4, 7))  # signals of a whole draft in one call
    assert st.confidence.shape == (4,)
    assert signals_from_logits(torch.randn(0, 7)).confidence.shape == (0,)


def test_half_precision_logits_are_upcast():
    s = signals_from_logits(torch.randn(50).to(torch.bfloat16))
    assert s.confidence.dtype == torch.float32
