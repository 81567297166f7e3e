"""The drafter pool: a goodput choice per step that stays lossless, prefers what is accepted, and
learns acceptance the right way."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from adaspec.api import Engine, make_config
from adaspec.calibration.cost import CostModel
from adaspec.decode import generate_ids
from adaspec.drafters.base import DraftContext
from adaspec.drafters.model import ModelDrafter
from adaspec.drafters.ngram import NGramDrafter, find_match
from adaspec.drafters.pool import MODEL_PRIOR, NGRAM_PRIOR, Acceptance, DrafterPool
from adaspec.models.tiny import ByteTokenizer, perturbed_copy, random_model, tiny_model

PROMPTS = [[5], [1, 2, 3], [65, 66, 67, 68, 65, 66, 67, 68, 65, 66, 67, 68, 65, 66], list(range(30, 60))]


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0, dtype=torch.float64)


@pytest.fixture(scope="module")
def models(target):
    return {
        "self": tiny_model(seed=0, dtype=torch.float64),  # agrees with the target everywhere
        "random": random_model(seed=7, dtype=torch.float64),  # almost never agrees
        "perturbed": perturbed_copy(target, noise=0.5, seed=3),  # agrees sometimes
    }


def pool_of(models, *names_costs, ngram=True, **kw) -> DrafterPool:
    """A pool over the named tiny drafters at the given costs (units of one target forward)."""
    drafters = [(ModelDrafter(models[n], name=n), c) for n, c in names_costs]
    return DrafterPool(drafters, NGramDrafter(259) if ngram else None, **kw)


def run(target, drafter, prompt, method="multi-draft", n=40, **opts):
    cfg = make_config(method, max_new_tokens=n, ignore_eos=True, **opts)
    return generate_ids(target, drafter, prompt, cfg)


@pytest.fixture(scope="module")
def ar_outputs(target):
    return {tuple(p): run(target, None, p, "ar").token_ids for p in PROMPTS}


class CopyModel:
    """A ModelAdapter whose greedy continuation repeats the token `period` positions back: its
    output copies its context, the case prompt lookup is for."""

    def __init__(self, period: int, vocab_size: int = 259):
        self.name, self.vocab_size, self.period = f"copy-{period}", vocab_size, period
        self.eos_token_ids, self.max_length, self.device = (257,), None, torch.device("cpu")
        self.ids: list[int] = []

    @property
    def length(self) -> int:
        return len(self.ids)

    def reset(self) -> None:
        self.ids = []

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        start = len(self.ids)
        self.ids += ids.tolist()
        logits = torch.zeros(len(ids), self.vocab_size, dtype=torch.float64)
        for j in range(len(ids)):
            nxt = start + j + 1 - self.period  # the position the next token copies
            logits[j, self.ids[nxt] if nxt >= 0 else 0] = 10.0
        return logits

    def rollback(self, length: int) -> None:
        self.ids = self.ids[:length]


# --- lossless under the goodput choice and under any forced choice --------------------------------

@pytest.mark.parametrize("method", ["multi-draft", "multi-draft-calibrated"])
def test_goodput_pool_greedy_equals_autoregressive(target, models, ar_outputs, method):
    for prompt in PROMPTS:
        for pair in ([("perturbed", 0.25)], [("perturbed", 0.25), ("random", 0.05)], [("self", 0.5)]):
            pool = pool_of(models, *pair)
            with pytest.warns(UserWarning) if method.endswith("calibrated") else _nothing():
                r = run(target, pool, prompt, method)
            assert r.token_ids == ar_outputs[tuple(prompt)], (method, prompt, pair)
            assert r.lossless
            assert sum(r.stats.drafters_used.values()) <= r.stats.steps
            assert set(r.stats.drafters_used) <= {"ngram"} | {n for n, _ in pair}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_pool_greedy_equals_autoregressive_under_random_selection(target, models, ar_outputs):
    """Force every step's drafter AND draft length from a seeded random sequence."""
    seen = set()
    for seed in range(6):
        rng = torch.Generator().manual_seed(seed)

        def select(options, rng=rng):
            o = options[int(torch.randint(len(options), (1,), generator=rng))]
            seen.add(o.name)
            k = int(torch.randint(o.limit + 1, (1,), generator=rng)) if o.limit else 0
            return dataclasses.replace(o, k=k)

        for prompt in PROMPTS:
            pool = pool_of(models, ("perturbed", 0.25), ("random", 0.05), ("self", 0.5), select=select)
            r = run(target, pool, prompt, "cmasd")
            assert r.token_ids == ar_outputs[tuple(prompt)], (seed, prompt)
    assert seen == {"none", "ngram", "perturbed", "random", "self"}


def test_pool_sampled_run_is_reproducible(target, models):
    """At temperature > 0 the pool's choices ride on the same seeded generator: same seed, same text."""
    outs = [run(target, pool_of(models, ("perturbed", 0.25)), PROMPTS[2], temperature=0.8, seed=3).token_ids
            for _ in range(2)]
    assert outs[0] == outs[1] and len(outs[0]) == 40


# --- the choice ------------------------------------------------------------------------------------

def test_prefers_ngram_on_copy_heavy_context():
    """A target that copies its context; a model drafter that is as accurate but costs a quarter of
    a forward per token: once lookup finds 3-token matches the free drafter wins every step."""
    period = 7
    copier = CopyModel(period)
    pool = DrafterPool([(ModelDrafter(CopyModel(period), name="copier"), 0.25)], NGramDrafter(259))
    r = run(copier, pool, list(range(65, 85)), n=80, trace=True)
    assert r.token_ids == run(copier, None, list(range(65, 85)), "ar", n=80).token_ids
    used = r.stats.drafters_used
    assert used.get("ngram", 0) > 3 * used.get("copier", 0)
    assert all(t.drafter == "ngram" for t in r.trace[-8:])
    assert r.stats.acceptance_rate > 0.9
    assert r.stats.mean_accepted > 4  # long free drafts: several tokens per target forward
    assert pool.estimate("ngram:3") > NGRAM_PRIOR[2]


def test_stops_choosing_a_drafter_whose_drafts_are_rejected(target, models):
    pool = pool_of(models, ("random", 0.25), ngram=False)
    r = run(target, pool, PROMPTS[1], n=80, trace=True)
    chose = [t.drafter == "random" for t in r.trace]
    assert chose[0]  # the prior gives it a first chance
    assert sum(chose) < len(chose) / 4  # then it is dropped, and only retried now and then
    assert sum(chose[:4]) >= 2 and sum(chose[-20:]) <= 3
    assert pool.estimate("random") < MODEL_PRIOR


def test_switches_from_a_cheap_bad_drafter_to_a_dear_good_one(target, models):
    pool = pool_of(models, ("random", 0.05), ("self", 0.3), ngram=False)
    r = run(target, pool, PROMPTS[1], n=80, trace=True)
    assert r.trace[0].drafter == "random"  # cheaper at equal priors
    assert r.stats.drafters_used["self"] > 3 * r.stats.drafters_used["random"]
    assert all(t.drafter == "self" for t in r.trace[-10:])
    assert pool.estimate("self") > 0.9 and pool.estimate("random") < MODEL_PRIOR


def test_options_are_priced_by_expected_goodput(models):
    """goodput(k) = (1 + sum_j a^j) / (k D + T(k + 1)), maximised over k, against 1 / T(1)."""
    T = {1: 1.0, 2: 1.0, 3: 1.2, 4: 2.0, 5: 2.0}
    pool = pool_of(models, ("self", 0.5), target_ms=lambda n: T.get(n, 3.0))
    seq = torch.tensor([1, 2, 3, 9, 9, 1, 2, 3])  # the trigram 1 2 3 recurs: continuation 9 9 1 2 3
    opts = {o.name: o for o in pool.options(seq, max_k=4)[0]}
    assert opts["none"].goodput == 1.0 and opts["none"].k == 0
    a = NGRAM_PRIOR[2]
    ng = opts["ngram"]
    assert (ng.key, ng.limit, ng.a) == ("ngram:3", 4, a)  # the continuation capped at max_k
    # free drafts: 2 tokens ride on the flat T(3) = 1.2; the jump to T(4) = 2 does not pay at a = 0.65
    assert ng.k == 2 and ng.goodput == pytest.approx((1 + a + a * a) / 1.2)
    m, a = opts["self"], MODEL_PRIOR
    assert m.k == 1 and m.goodput == pytest.approx((1 + a) / (0.5 + 1.0))
    assert max(opts.values(), key=lambda o: o.goodput).name == "ngram"
    # a drafter dearer than the target never pays: no draft
    dear = pool_of(models, ("self", 5.0), ngram=False)
    assert max(dear.options(seq, 4)[0], key=lambda o: o.goodput).name == "none"


def test_entropy_veto_removes_model_drafters(models):
    pool = pool_of(models, ("self", 0.1), skip_entropy=0.2)
    pool.regime_entropy = 0.5
    names = {o.name for o in pool.options(torch.tensor([4, 5, 6]), 4)[0]}
    assert names == {"none"}
    pool.regime_entropy = 0.1
    assert {o.name for o in pool.options(torch.tensor([4, 5, 6]), 4)[0]} == {"none", "self"}


# --- learning --------------------------------------------------------------------------------------

def test_acceptance_posterior_mean():
    r = Acceptance(prior=0.6, weight=4.0)
    assert r.mean == pytest.approx(0.6)
    r.observe(3, 3)  # all accepted: 3 successes, no rejection
    assert r.mean == pytest.approx((2.4 + 3) / 7)
    r.observe(0, 4)  # first token rejected
    assert r.mean == pytest.approx((2.4 + 3) / 8)
    r.decay(0.5)
    assert r.mean == pytest.approx((2.4 + 1.5) / 6)


def force(name):
    return lambda options: next(o for o in options if o.name == name)


def test_estimates_move_with_committed_outcomes(target, models):
    pool = pool_of(models, ("self", 0.25), select=force("self"))
    seq = torch.tensor(PROMPTS[1])
    pool.begin(seq)
    ctx = DraftContext(make_config("fixed").sampling, keep_drafting=lambda i, s: True)
    draft = pool.propose(seq, 4, ctx)
    assert len(draft) >= 1 and draft.drafter == "self"
    pool.commit(len(seq) + len(draft))  # all accepted
    up = pool.estimate("self")
    assert up > MODEL_PRIOR
    seq = torch.cat([seq, draft.tokens, torch.tensor([7])])  # the accepted drafts and a bonus token
    pool.propose(seq, 4, ctx)
    pool.commit(len(seq))  # the first draft token rejected
    assert pool.estimate("self") < up
    assert pool.estimate("ngram:1") == NGRAM_PRIOR[0]  # untouched estimates stay at their prior
    pool.begin(seq)  # a new request starts from the priors
    assert pool.estimate("self") == MODEL_PRIOR


def test_ngram_estimates_are_keyed_by_match_length(models):
    pool = pool_of(models, ngram=True, select=force("ngram"))
    ctx = DraftContext(make_config("fixed").sampling)
    seq = torch.tensor([1, 2, 3, 9, 9, 1, 2, 3])
    assert find_match(seq, 4)[1] == 3
    pool.begin(seq)
    d = pool.propose(seq, 4, ctx)
    pool.commit(len(seq) + len(d))
    seq1 = torch.tensor([7, 4, 5, 7])  # only a one-token match
    d = pool.propose(seq1, 4, ctx)
    pool.commit(len(seq1))
    assert pool.estimate("ngram:3") > NGRAM_PRIOR[2]
    assert pool.estimate("ngram:1") < NGRAM_PRIOR[0]
    assert pool.estimate("ngram:2") == NGRAM_PRIOR[1]


def test_unused_estimates_drift_back_to_their_prior(models):
    pool = pool_of(models, ("self", 0.25), select=force("self"))
    seq = torch.tensor(PROMPTS[1])
    pool.begin(seq)
    ctx = DraftContext(make_config("fixed").sampling, keep_drafting=lambda i, s: True)
    for _ in range(3):
        pool.propose(seq, 2, ctx)
        pool.commit(len(seq))  # rejected at once
        seq = torch.cat([seq, torch.tensor([7])])  # the corrected token
    low = pool.estimate("self")
    assert low < MODEL_PRIOR
    for _ in range(50):
        pool.commit(len(seq))  # steps without a draft from it
    assert low < pool.estimate("self") < MODEL_PRIOR


# --- construction ----------------------------------------------------------------------------------

def test_pool_rejects_bad_drafter_lists(models):
    with pytest.raises(ValueError):
        DrafterPool([], None)
    with pytest.raises(ValueError):
        DrafterPool([(ModelDrafter(models["self"]), 0.1), (ModelDrafter(models["random"]), 0.1)], None)  # same name
    with pytest.raises(ValueError):
        DrafterPool([(ModelDrafter(tiny_model(seed=1, vocab_size=100)), 0.1)], NGramDrafter(259))


def test_engine_pool_costs_extra_drafters_and_profile(target, models):
    engine = Engine(target, models["perturbed"], ByteTokenizer())
    engine.extra_drafters.append((ModelDrafter(models["random"], name="random"), 0.1))
    cfg = make_config("multi-draft")
    pool = engine.prepare(cfg).drafter
    assert [(d.name, c) for d, c in pool.models] == [("model", 0.25), ("random", 0.1)]
    assert pool.target_ms(3) == pytest.approx(1.2) and pool.estimate("model") == MODEL_PRIOR
    r = engine.generate(PROMPTS[2], method="multi-draft", max_new_tokens=40, ignore_eos=True)
    assert r.token_ids == engine.generate(PROMPTS[2], method="ar", max_new_tokens=40, ignore_eos=True).token_ids
    assert set(r.stats.drafters_used) <= {"ngram", "model", "random"}
    # with a profile: measured ms, the target's cost curve, the pair's measured acceptance as prior
    cost = CostModel(target_ms={1: 80.0, 4: 86.0}, drafter_ms_per_token=35.0, machine="test", threads=1)
    engine.profile = SimpleNamespace(cost=cost, fit={"fit": {"base_rate": 0.73}})
    pool = engine.prepare(cfg).drafter
    assert [(d.name, c) for d, c in pool.models] == [("model", 35.0), ("random", pytest.approx(8.0))]
    assert pool.target_ms(4) == 86.0 and pool.estimate("model") == 0.73
