"""Verification rules: hand-built cases for each rule, relaxed == greedy at tau = 0, and
rejection sampling checked against the target distribution with chi-square and TV bounds.

The large-sample checks run `verify._rejection`, the batched body that `rejection_sample` calls with
no batch dims; smaller checks go through the public function itself.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from adaspec.config import SamplingConfig
from adaspec.records import Verdict
from adaspec.sampling import make_generator, sample_rows, warp
from adaspec.verify import (
    _rejection,
    greedy_match,
    rejection_sample,
    relaxed_accept,
    typical_accept,
    verify,
)

GREEDY = SamplingConfig(temperature=0.0)
T1 = SamplingConfig(temperature=1.0)
ALPHA = 1e-4  # significance of every distribution test; all are seeded, so none can flake


def L(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def toks(*ids) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


# --- statistics ---------------------------------------------------------------------------------


def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df > x), closed forms for integer df (regularised upper incomplete gamma Q(df/2, x/2))."""
    h = x / 2
    if df % 2 == 0:  # Q(m, h) = e^-h sum_{i<m} h^i / i!
        term, total = 1.0, 1.0
        for i in range(1, df // 2):
            term *= h / i
            total += term
        return math.exp(-h) * total
    # Q(m + 1/2, h) = erfc(sqrt h) + e^-h sum_{i<m} h^(i+1/2) / Gamma(i + 3/2)
    total, term = math.erfc(math.sqrt(h)), math.sqrt(h) / math.gamma(1.5)
    for i in range(df // 2):
        total += math.exp(-h) * term
        term *= h / (i + 1.5)
    return total


def test_chi2_sf_matches_tabulated_critical_values():
    # Tabulated chi2 quantiles at 1 - 1e-4 (scipy.stats.chi2.isf(1e-4, df)) for df = 1..7.
    for df, crit in enumerate((15.137, 18.421, 21.108, 23.513, 25.745, 27.856, 29.878), start=1):
        assert chi2_sf(crit, df) == pytest.approx(1e-4, rel=2e-3)


def assert_follows(draws: torch.Tensor, expected: torch.Tensor) -> None:
    """draws (N,) token ids (or flattened cells) against expected probabilities (C,)."""
    expected = expected.double() / expected.double().sum()
    n, cells = draws.numel(), expected.numel()
    counts = torch.bincount(draws.flatten(), minlength=cells).double()
    assert counts[expected == 0].sum() == 0, "drew a token the target gives probability 0"
    # Pool cells expecting fewer than 5 draws so that the chi-square approximation holds.
    big = expected * n >= 5
    obs = torch.cat([counts[big], counts[~big & (expected > 0)].sum().reshape(1)])
    exp = torch.cat([expected[big] * n, (expected[~big] * n).sum().reshape(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    df = obs.numel() - 1
    if df > 0:
        assert chi2_sf(stat, df) > ALPHA, f"chi2 = {stat:.1f} with {df} df"
    # Bretagnolle-Huber-Carol: P(TV >= e) <= 2^C exp(-2 N e^2), solved for the bound at ALPHA.
    tv = 0.5 * (counts / n - expected).abs().sum().item()
    assert tv < math.sqrt((cells * math.log(2) + math.log(1 / ALPHA)) / (2 * n)), f"TV = {tv:.4f}"


# --- greedy_match -------------------------------------------------------------------------------

# Target argmaxes per row: q_0 -> 2, q_1 -> 0, q_2 -> 3.
TARGET = L([0, 1, 5, 2], [4, 1, 1, 0], [0, 0, 1, 3])


def test_greedy_match_perfect_match_takes_the_bonus():
    assert greedy_match(toks(2, 0), TARGET) == Verdict(2, 3, [True, True])


def test_greedy_match_early_mismatch_corrects_with_the_argmax():
    assert greedy_match(toks(1, 0), TARGET) == Verdict(0, 2, [False, False])
    assert greedy_match(toks(2, 3), TARGET) == Verdict(1, 0, [True, False])


def test_greedy_match_k0_and_ties():
    assert greedy_match(toks(), TARGET[:1]) == Verdict(0, 2, [])
    tied = L([1, 3, 3], [0, 0, 0])
    assert greedy_match(toks(2), tied) == Verdict(0, 1, [False])  # argmax takes the first tie
    assert greedy_match(toks(1), tied) == Verdict(1, 0, [True])


# --- rejection_sample: hand-built cases -----------------------------------------------------------

BIG = 60.0  # a logit gap of 60 leaves the others e^-60 ~ 1e-26 of the mass: practically one-hot


def test_rejection_perfect_match_accepts_all_and_draws_the_bonus():
    q = L([BIG, 0, 0, 0], [0, BIG, 0, 0], [0, 0, 0, BIG])
    p = warp(q[:2], T1)  # p == q: u * p < q always holds
    g = make_generator(0)
    for _ in range(20):
        assert rejection_sample(toks(0, 1), p, q, T1, g) == Verdict(2, 3, [True, True])


def test_rejection_early_mismatch_draws_the_correction_from_the_residual():
    q = L([BIG, 0, 0, 0], [0, 0, BIG, -math.inf], [0, 0, 0, 0])
    g = make_generator(0)
    # d_2 = 3 has q_1 = 0 so it is always rejected; the residual q_1 - onehot(3) puts all mass on 2.
    assert rejection_sample(toks(0, 3), None, q, T1, g) == Verdict(1, 2, [True, False])
    # Residual max(0, q - p) excludes what the drafter over-proposed: here token 2.
    p = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.25] * 4], dtype=torch.float64)
    q2 = L([0, 0, 0, -math.inf], [0, 0, 0, 0], [0, 0, 0, 0])  # q_0 = 1/3 on 0, 1, 2
    for _ in range(50):
        v = rejection_sample(toks(2, 0), p, q2, T1, g)
        assert v.n_accepted >= 1 or v.next_token in (0, 1)


def test_rejection_k0_samples_q0_and_temperature_0_is_greedy():
    g = make_generator(0)
    assert rejection_sample(toks(), None, L([0, 0, BIG]), T1, g) == Verdict(0, 2, [])
    gen = torch.Generator().manual_seed(5)
    for _ in range(200):
        k, vocab = int(torch.randint(0, 4, (1,), generator=gen)), int(torch.randint(2, 6, (1,), generator=gen))
        target = torch.randint(-2, 2, (k + 1, vocab), generator=gen).double()  # many ties
        tokens = torch.randint(0, vocab, (k,), generator=gen)
        p = torch.rand(k, vocab, generator=gen).softmax(-1)
        assert rejection_sample(tokens, p, target, GREEDY, g) == greedy_match(tokens, target)


# --- rejection_sample reproduces the target ---------------------------------------------------------

N = 40_000


def first_committed(p: torch.Tensor | None, d_fixed: torch.Tensor | None, q: torch.Tensor,
                    seed: int) -> torch.Tensor:
    """N independent steps; the first committed token of each (accepted d_1 or the correction).

    p (k, V) drafter distributions (tokens drawn from them) or None with fixed tokens d_fixed (k,);
    q (k+1, V) target probabilities.
    """
    g = make_generator(seed)
    vocab = q.shape[-1]
    if p is None:
        tokens = d_fixed.expand(N, -1)  # (N, k)
        p = F.one_hot(d_fixed, vocab).to(q.dtype)  # (k, V), as rejection_sample builds it
    else:
        tokens = torch.stack([sample_rows(row.expand(N, -1), g) for row in p], dim=-1)  # (N, k)
    k = tokens.shape[-1]
    n, token = _rejection(tokens, p.expand(N, k, vocab), q.expand(N, k + 1, vocab), g)
    return torch.where(n >= 1, tokens[:, 0], token)  # (N,)


def random_logits(seed: int, rows: int, vocab: int, scale: float = 1.5) -> torch.Tensor:
    return scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


SAMPLINGS = [
    T1,
    SamplingConfig(temperature=0.7, top_k=4, top_p=0.9),
    SamplingConfig(temperature=1.6, top_p=0.8),
    SamplingConfig(temperature=0.5, top_k=3),
]


@pytest.mark.parametrize("s", SAMPLINGS, ids=["T1", "T0.7-k4-p0.9", "T1.6-p0.8", "T0.5-k3"])
def test_first_token_follows_q0_random_p_and_q(s):
    p_logits, q_logits = random_logits(1, 3, 6), random_logits(2, 4, 6)
    q = warp(q_logits, s)  # (k+1, V) the target distribution rejection sampling must reproduce
    assert_follows(first_committed(warp(p_logits, s), None, q, seed=10), q[0])


def test_first_token_follows_q0_when_p_equals_q():
    q = warp(random_logits(3, 3, 6), T1)
    assert_follows(first_committed(q[:2].clone(), None, q, seed=11), q[0])


def test_first_token_follows_q0_when_p_is_a_perturbed_q():
    # TV(p, q) ~ 0.05: rejections are rare, so the correction must come from the small residual.
    q_logits = random_logits(7, 3, 6)
    p = warp(q_logits[:2] + 0.15 * random_logits(8, 2, 6), T1)
    q = warp(q_logits, T1)
    assert 0.02 < 0.5 * (p[0] - q[0]).abs().sum() < 0.1
    assert_follows(first_committed(p, None, q, seed=14), q[0])


def test_bonus_token_follows_qk():
    s = SamplingConfig(temperature=0.9, top_k=5)
    q = warp(random_logits(9, 3, 6), s)
    g = make_generator(15)
    tokens = torch.stack([sample_rows(row.expand(N, -1), g) for row in q[:2]], dim=-1)  # (N, 2)
    n, token = _rejection(tokens, q[:2].expand(N, 2, 6), q.expand(N, 3, 6), g)  # p == q: all accepted
    assert (n == 2).all()
    assert_follows(token, q[2])


def test_first_token_follows_q0_with_disjoint_supports():
    mask = torch.tensor([True, True, True, False, False, False])
    p = warp(random_logits(4, 2, 6).masked_fill(~mask, -math.inf), T1)  # drafter only on 0..2
    q = warp(random_logits(5, 3, 6).masked_fill(mask, -math.inf), T1)  # target only on 3..5
    draws = first_committed(p, None, q, seed=12)
    assert (draws >= 3).all()  # every draft rejected
    assert_follows(draws, q[0])


@pytest.mark.parametrize("d", [0, 2, 5])
def test_first_token_follows_q0_with_a_one_hot_drafter(d):
    q_logits = random_logits(6, 3, 6)
    q_logits[0, 5] = -math.inf  # d = 5 is a token the target never produces
    q = warp(q_logits, T1)
    assert_follows(first_committed(None, toks(d, 1), q, seed=13 + d), q[0])


def test_two_committed_tokens_follow_the_target_jointly():
    """k = 2 with context: p_2, q_1 depend on the first token. Joint (c_1, c_2) must be
    q_0(c_1) q_1(c_2 | c_1); when d_1 is rejected, c_2 comes from a second step (k = 1)."""
    s, vocab = SamplingConfig(temperature=0.9, top_p=0.95), 5
    g = make_generator(20)
    p1 = warp(random_logits(21, 1, vocab)[0], s)  # (V,)
    p2 = warp(random_logits(22, vocab, vocab), s)  # (V, V) row a = p_2(. | d_1 = a)
    q0 = warp(random_logits(23, 1, vocab)[0], s)  # (V,)
    q1 = warp(random_logits(24, vocab, vocab), s)  # (V, V) row a = q_1(. | a)
    q_after = torch.full((N, vocab), 1 / vocab, dtype=torch.float64)  # bonus row, irrelevant here

    d1 = sample_rows(p1.expand(N, -1), g)  # (N,)
    d2 = sample_rows(p2[d1], g)  # (N,)
    n, token = _rejection(torch.stack([d1, d2], -1), torch.stack([p1.expand(N, -1), p2[d1]], 1),
                          torch.stack([q0.expand(N, -1), q1[d1], q_after], 1), g)
    c1 = torch.where(n >= 1, d1, token)
    c2 = torch.where(n >= 2, d2, token)  # valid where n >= 1

    redo = n == 0  # the correction ended the step: c_2 is the next step's first committed token
    m, ctx = int(redo.sum()), c1[redo]
    d = sample_rows(p2[ctx], g)  # (m,)
    n2, token2 = _rejection(d[:, None], p2[ctx][:, None], torch.stack([q1[ctx], q_after[:m]], 1), g)
    c2[redo] = torch.where(n2 >= 1, d, token2)

    joint = q0[:, None] * q1  # (V, V)
    assert_follows(c1 * vocab + c2, joint.flatten())


def test_public_rejection_sample_follows_q0():
    """The public path, call by call (fewer draws, so a looser but still exact test)."""
    s = SamplingConfig(temperature=0.8, top_k=5)
    p = warp(random_logits(30, 2, 6), s)
    q_logits = random_logits(31, 3, 6)
    q0 = warp(q_logits, s)[0]
    g = make_generator(32)
    draws, fixed = [], []
    for _ in range(2000):
        tokens = sample_rows(p, g)  # (k,) one draw per position
        v = rejection_sample(tokens, p, q_logits, s, g)
        draws.append(tokens[0].item() if v.n_accepted else v.next_token)
        w = verify("exact", toks(1, 4), None, q_logits, sampling=s, generator=g)
        fixed.append(1 if w.n_accepted else w.next_token)
    assert_follows(torch.tensor(draws), q0)
    assert_follows(torch.tensor(fixed), q0)


# --- relaxed_accept -----------------------------------------------------------------------------


def test_relaxed_at_tau0_beta1_is_greedy_on_random_cases():
    gen = torch.Generator().manual_seed(0)
    for case in range(600):
        k, vocab = int(torch.randint(0, 5, (1,), generator=gen)), int(torch.randint(2, 7, (1,), generator=gen))
        dtype = (torch.float32, torch.float64, torch.bfloat16)[case % 3]
        # Small integer logits make ties common; half the draft tokens copy the argmax.
        target = torch.randint(-2, 3, (k + 1, vocab), generator=gen).to(dtype)
        tokens = torch.where(torch.rand(k, generator=gen) < 0.5, target[:k].argmax(-1),
                             torch.randint(0, vocab, (k,), generator=gen))
        expect = greedy_match(tokens, target)
        assert relaxed_accept(tokens, target, torch.zeros(k), 1, GREEDY) == expect
        assert verify("relaxed", tokens, None, target, sampling=GREEDY) == expect


def test_relaxed_accepts_a_near_top_token_and_beta_limits_it():
    target = L([0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]).log()  # softmax = these rows
    tokens = toks(1, 1)  # d_1 is second in q_0 (gap 0.1); d_2 is the argmax of q_1
    assert greedy_match(tokens, target) == Verdict(0, 0, [False, False])
    assert relaxed_accept(tokens, target, torch.tensor([0.15, 0.0]), 2, GREEDY) == Verdict(2, 2, [True, True])
    assert relaxed_accept(tokens, target, torch.tensor([0.05, 0.0]), 2, GREEDY).n_accepted == 0  # gap > tau
    assert relaxed_accept(tokens, target, torch.tensor([0.15, 0.0]), 1, GREEDY).n_accepted == 0  # rank 1 >= beta
    # Third-ranked token 2 in q_0: gap 0.4 needs tau >= 0.4 and beta >= 3.
    assert relaxed_accept(toks(2, 1), target, torch.tensor([0.5, 0.0]), 2, GREEDY).n_accepted == 0
    assert relaxed_accept(toks(2, 1), target, torch.tensor([0.5, 0.0]), 3, GREEDY).n_accepted == 2


def test_relaxed_measures_the_gap_at_t1_whatever_the_temperature():
    target = L([0.5, 0.4, 0.1], [0.0, 0.0, 0.0]).log()
    cold = SamplingConfig(temperature=0.01)  # warp would make the gap ~1; the rule still sees 0.1
    v = relaxed_accept(toks(1), target, torch.tensor([0.15]), 2, cold, make_generator(0))
    assert v.n_accepted == 1 and v.accepted_mask == [True]
    # A rejected token at T > 0 is corrected by a draw from warp(q_0): token 0 (1 - 2e-10) here.
    assert relaxed_accept(toks(2), target, 0.0, 1, cold, make_generator(0)) == Verdict(0, 0, [False])


# --- typical_accept -----------------------------------------------------------------------------

# q_0 = (0.6, 0.3, 0.1): H = -(0.6 ln 0.6 + 0.3 ln 0.3 + 0.1 ln 0.1) = 0.8979 nats, exp(-H) = 0.4074,
# so delta * exp(-H) = 0.1222 at delta = 0.3.
TYPICAL = L([0.6, 0.3, 0.1], [0.0, 0.0, 0.0]).log()


def test_typical_threshold_by_hand():
    h = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    assert 0.3 * math.exp(-h) == pytest.approx(0.1222, abs=1e-4)
    # eps = 0.09 is the minimum: q(2) = 0.1 > 0.09 passes.
    assert typical_accept(toks(2), TYPICAL, GREEDY, eps=0.09, delta=0.3) == Verdict(1, 0, [True])
    # eps = 0.2: threshold = min(0.2, 0.1222) = 0.1222, so 0.1 fails and 0.3 passes.
    assert typical_accept(toks(2), TYPICAL, GREEDY, eps=0.2, delta=0.3) == Verdict(0, 0, [False])
    assert typical_accept(toks(1), TYPICAL, GREEDY, eps=0.2, delta=0.3) == Verdict(1, 0, [True])
    # delta = 0.8: threshold = min(0.35, 0.8 * 0.4074 = 0.3259) rejects 0.3; the argmax stays.
    assert typical_accept(toks(1), TYPICAL, GREEDY, eps=0.35, delta=0.8).n_accepted == 0
    assert typical_accept(toks(0), TYPICAL, GREEDY, eps=0.35, delta=0.8).n_accepted == 1


def test_typical_at_t_above_0_measures_the_warped_target():
    # At T = 0.5, q = (0.36, 0.09, 0.01) / 0.46 = (0.783, 0.196, 0.022): token 2 falls below 0.09.
    half = SamplingConfig(temperature=0.5)
    assert typical_accept(toks(2), TYPICAL, half, generator=make_generator(0)).n_accepted == 0
    assert typical_accept(toks(1), TYPICAL, half, generator=make_generator(0)).n_accepted == 1
    # Top-k cuts token 2 from q: it has q = 0 and cannot pass.
    assert typical_accept(toks(2), TYPICAL, SamplingConfig(temperature=1.0, top_k=2),
                          generator=make_generator(0)).n_accepted == 0


def test_typical_perfect_match_k0_and_early_mismatch():
    target = L([BIG, 0, 0], [0, BIG, 0], [0, 0, BIG])
    assert typical_accept(toks(0, 1), target, GREEDY) == Verdict(2, 2, [True, True])
    assert typical_accept(toks(0, 2), target, GREEDY) == Verdict(1, 1, [True, False])
    assert typical_accept(toks(), target[:1], GREEDY) == Verdict(0, 0, [])
    assert typical_accept(toks(), target[2:], T1, generator=make_generator(0)) == Verdict(0, 2, [])


def test_lossy_rules_correct_by_sampling_warped_q_at_t_above_0():
    s = SamplingConfig(temperature=1.3, top_p=0.9)
    q_logits = random_logits(40, 2, 5)
    q_logits[0, 4] = -math.inf  # d_1 = 4 is rejected by both rules
    g = make_generator(41)
    relaxed = [relaxed_accept(toks(4), q_logits, 0.0, 1, s, g).next_token for _ in range(2000)]
    typical = [typical_accept(toks(4), q_logits, s, generator=g).next_token for _ in range(2000)]
    assert_follows(torch.tensor(relaxed), warp(q_logits[0], s))
    assert_follows(torch.tensor(typical), warp(q_logits[0], s))


# --- determinism, dispatch, errors --------------------------------------------------------------


def test_seeded_generators_reproduce_verdicts():
    s = SamplingConfig(temperature=1.0, top_k=6)
    p = warp(random_logits(50, 3, 8), s)
    target = random_logits(51, 4, 8)

    def run(seed):
        g = make_generator(seed)
        out = []
        for _ in range(30):
            tokens = sample_rows(p, g)
            out.append(verify("exact", tokens, p, target, sampling=s, generator=g))
            out.append(verify("typical", tokens, None, target, sampling=s, generator=g))
            out.append(verify("relaxed", tokens, None, target, sampling=s, taus=0.2, beta=2, generator=g))
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_verify_dispatches_to_the_rules():
    target = random_logits(60, 4, 6)
    tokens = toks(target[0].argmax().item(), 1, 2)
    p = warp(random_logits(61, 3, 6), T1)
    assert verify("exact", tokens, p, target, sampling=GREEDY) == greedy_match(tokens, target)
    assert (verify("exact", tokens, p, target, sampling=T1, generator=make_generator(3))
            == rejection_sample(tokens, p, target, T1, make_generator(3)))
    assert (verify("typical", tokens, None, target, sampling=GREEDY, eps=0.2, delta=0.5)
            == typical_accept(tokens, target, GREEDY, eps=0.2, delta=0.5))
    taus = torch.tensor([0.3, 0.3, 0.3])
    assert (verify("relaxed", tokens, None, target, sampling=GREEDY, taus=taus, beta=3)
            == relaxed_accept(tokens, target, taus, 3, GREEDY))


@pytest.mark.parametrize("call, match", [
    (lambda: verify("nope", toks(1), None, L([0, 1], [1, 0]), sampling=GREEDY), "unknown verification rule"),
    (lambda: verify("exact", toks(1), None, L([0, 1]), sampling=GREEDY), r"\(k\+1, V\)"),
    (lambda: verify("exact", toks(1, 0), None, L([0, 1], [1, 0]), sampling=GREEDY), r"\(k\+1, V\)"),
    (lambda: verify("exact", toks(1), torch.ones(1, 3), L([0, 1], [1, 0]), sampling=T1), r"p must have"),
    (lambda: verify("typical", toks(1), torch.ones(2, 2), L([0, 1], [1, 0]), sampling=T1), r"p must have"),
    (lambda: verify("exact", toks(1)[None], None, L([0, 1], [1, 0]), sampling=GREEDY), r"shape \(k,\)"),
    (lambda: greedy_match(torch.tensor([1.0]), L([0, 1], [1, 0])), "integer"),
    (lambda: relaxed_accept(toks(1), L([0, 1], [1, 0]), torch.zeros(2), 1, GREEDY), "taus"),
    (lambda: relaxed_accept(toks(1), L([0, 1], [1, 0]), torch.zeros(1), 0, GREEDY), "beta"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
