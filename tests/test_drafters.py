import pytest
import torch

from adaspec.api import Engine, make_config
from adaspec.config import AdaspecError
from adaspec.decode import generate_ids
from adaspec.drafters.model import ModelDrafter
from adaspec.drafters.ngram import NGramDrafter, find_match
from adaspec.drafters.pool import DrafterPool
from adaspec.models.tiny import ByteTokenizer, perturbed_copy, tiny_model
from adaspec.policies.cost import FALLBACK_DRAFTER


def t(xs):
    return torch.tensor(xs, dtype=torch.long)


def test_find_match_prefers_long_and_recent_matches():
    seq = t([1, 2, 3, 9, 9, 2, 3, 7, 8, 5, 1, 2, 3])
    # trigram [1,2,3] occurs at 0 -> continuation 9, 9, 2
    assert find_match(seq, 3)[0].tolist() == [9, 9, 2]
    # the bigram [2, 3] would match later (followed by 7); the longer match wins
    assert find_match(seq, 3, max_ngram=2)[0].tolist() == [7, 8, 5]
    assert find_match(seq, 10)[0].tolist() == [9, 9, 2, 3, 7, 8, 5, 1, 2, 3]
    assert find_match(t([4, 5, 6]), 3)[0].tolist() == []
    assert find_match(t([4]), 3)[0].tolist() == []
    assert find_match(seq, 0)[0].tolist() == []


def test_ngram_drafter_contract():
    d = NGramDrafter(vocab_size=10)
    draft = d.propose(t([1, 2, 1]), max_k=4)
    assert draft.tokens.tolist() == [2, 1] and draft.probs is None and len(draft.signals) == 2
    assert draft.drafter == "ngram"
    with pytest.raises(ValueError):
        NGramDrafter(10, max_ngram=1, min_ngram=2)


@pytest.fixture(scope="module")
def pair():
    target = tiny_model(seed=0, dtype=torch.float64)
    return target, perturbed_copy(target, noise=0.3, seed=5)


PROMPT = [65, 66, 67, 68, 65, 66, 67, 68, 65, 66, 67, 68, 65, 66]  # repetitive: prompt lookup finds matches


@pytest.mark.parametrize("method", ["ngram", "multi-draft"])
def test_pool_and_ngram_are_lossless(pair, method):
    target, draft_model = pair
    engine = Engine(target, draft_model, ByteTokenizer())
    base = engine.generate(PROMPT, method="ar", max_new_tokens=48, ignore_eos=True)
    r = engine.generate(PROMPT, method=method, max_new_tokens=48, ignore_eos=True, k=4)
    assert r.token_ids == base.token_ids
    assert r.lossless


def test_pool_identical_under_any_selection_sequence(pair):
    """Lossless whatever is chosen: force random choices between n-gram, model and no draft."""
    target, draft_model = pair
    cfg = make_config("cmasd", max_new_tokens=40, ignore_eos=True)
    base = generate_ids(target, None, PROMPT, cfg).token_ids

    class RandomPool(DrafterPool):
        def __init__(self, *a, seed=0, **kw):
            super().__init__(*a, **kw)
            self.rng = torch.Generator().manual_seed(seed)
            self.choices = []

        def propose(self, seq, max_k, ctx):
            c = int(torch.randint(0, 3, (1,), generator=self.rng))
            self.choices.append(c)
            if c == 0:
                return self.ngram.propose(seq, max_k)
            if c == 1:
                return self.models[0][0].propose(seq, max_k, ctx)
            return super().propose(seq, 0, ctx)

    for seed in range(5):
        pool = RandomPool([(ModelDrafter(draft_model), FALLBACK_DRAFTER)], NGramDrafter(target.vocab_size), seed=seed)
        r = generate_ids(target, pool, PROMPT, cfg)
        assert r.token_ids == base, seed
        assert len(set(pool.choices)) == 3


def test_pool_skips_drafting_in_high_entropy_regime(pair):
    target, draft_model = pair
    cfg = make_config("multi-draft", max_new_tokens=30, ignore_eos=True, skip_entropy=0.0)
    pool = DrafterPool([(ModelDrafter(draft_model), FALLBACK_DRAFTER)], None, skip_entropy=0.0)
    r = generate_ids(target, pool, [1, 2, 3], cfg)
    # after the first model draft the regime estimate exceeds 0, so most steps draft nothing
    assert r.stats.drafters_used.get("model", 0) < r.stats.steps / 2
    assert r.token_ids == generate_ids(target, None, [1, 2, 3], cfg).token_ids


def test_multi_draft_logs_drafters_used(pair):
    target, draft_model = pair
    engine = Engine(target, draft_model, ByteTokenizer())
    r = engine.generate(PROMPT, method="multi-draft", max_new_tokens=40, ignore_eos=True)
    assert set(r.stats.drafters_used) <= {"ngram", "model"}
    assert sum(r.stats.drafters_used.values()) <= r.stats.steps


def test_ngram_needs_no_drafter_model(pair):
    target, _ = pair
    engine = Engine(target, None, ByteTokenizer())
    r = engine.generate(PROMPT, method="ngram", max_new_tokens=20, ignore_eos=True)
    assert r.token_ids == engine.generate(PROMPT, method="ar", max_new_tokens=20, ignore_eos=True).token_ids


@pytest.mark.parametrize("context", [1, 3, 12])
def test_drafter_with_a_short_context_reads_only_the_prompts_tail_and_keeps_output(pair, context):
    target, draft_model = pair
    drafter = ModelDrafter(draft_model, context=context)
    prompt = list(range(40, 70))  # 30 tokens: longer than every context here
    drafter.begin(torch.tensor(prompt))
    assert draft_model.length == context - 1  # only the tail, less the last token, is prefilled
    ar = generate_ids(target, None, prompt, make_config("ar", max_new_tokens=24, ignore_eos=True))
    for method in ("fixed", "cmasd"):
        got = generate_ids(target, drafter, prompt, make_config(method, max_new_tokens=24, ignore_eos=True))
        assert got.token_ids == ar.token_ids
        assert got.stats.drafted > 0


@pytest.mark.parametrize("context", [None, 12])
def test_a_lazy_drafter_reads_the_prompt_with_its_first_draft(pair, context):
    """lazy=True (the batch scheduler's): begin feeds nothing; the first draft feeds the prompt
    (its tail, with a context) in its first forward and proposes what an eager drafter proposes."""
    from adaspec.drafters.base import DraftContext

    target, draft_model = pair
    prompt = torch.tensor(list(range(40, 70)))
    ctx = DraftContext(make_config("fixed").sampling)
    drafts = {}
    for lazy in (False, True):
        drafter = ModelDrafter(draft_model, context=context, lazy=lazy)
        drafter.begin(prompt)
        assert draft_model.length == (0 if lazy else (context or len(prompt)) - 1)
        drafts[lazy] = drafter.propose(prompt, 4, ctx).tokens.tolist()
        assert draft_model.length == (context or len(prompt)) + 3  # the prompt (tail) and 3 drafts fed
    assert drafts[True] == drafts[False] and len(drafts[True]) == 4
    ar = generate_ids(target, None, prompt.tolist(), make_config("ar", max_new_tokens=24, ignore_eos=True))
    got = generate_ids(target, ModelDrafter(draft_model, context=context, lazy=True), prompt.tolist(),
                       make_config("fixed", max_new_tokens=24, ignore_eos=True))
    assert got.token_ids == ar.token_ids and got.stats.drafted > 0


def test_draft_context_is_a_request_knob_and_must_be_positive(pair):
    target, draft_model = pair
    with pytest.raises(ValueError, match="at least 1"):
        ModelDrafter(draft_model, context=0)
    engine = Engine(target, draft_model)
    prompt = list(range(40, 70))
    ar = engine.generate(prompt, method="ar", max_new_tokens=16, ignore_eos=True)
    for method in ("cmasd", "multi-draft"):
        short = engine.generate(prompt, method=method, max_new_tokens=16, ignore_eos=True, draft_context=4)
        assert short.token_ids == ar.token_ids
    from adaspec.config import AdaspecError

    with pytest.raises(AdaspecError, match="draft_context"):
        engine.generate(prompt, method="cmasd", draft_context=-5)


def test_min_ngram_knob_drops_short_matches():
    engine = Engine(tiny_model(seed=0), None)
    seq = t([7, 4, 5, 7])  # only a one-token match ([7] -> 4)
    assert engine.prepare(make_config("ngram")).drafter.propose(seq, 4).tokens.tolist() == [4, 5, 7]
    assert engine.prepare(make_config("ngram", min_ngram=2)).drafter.propose(seq, 4).tokens.tolist() == []
    with pytest.raises(AdaspecError, match="min_ngram"):
        make_config("ngram", min_ngram=4)  # longer than max_ngram
    prompt = [65, 66, 67, 65, 66, 67, 65, 66]
    ar = engine.generate(prompt, method="ar", max_new_tokens=20, ignore_eos=True).token_ids
    assert engine.generate(prompt, method="ngram", min_ngram=2, max_new_tokens=20, ignore_eos=True).token_ids == ar
