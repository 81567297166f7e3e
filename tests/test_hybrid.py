"""Method head-lookup (drafters/hybrid.py): prompt lookup or the draft head, whichever is expected to
commit more per unit of time. Its output equals plain decoding (greedy) and follows the target's
distribution (sampling) whichever runs; its choice follows the priced acceptance estimates."""

from __future__ import annotations

import torch
from test_decode import check_follows_the_target
from test_fast import _ids, _model
from test_head import _head, _vocab

from adaspec.api import Engine
from adaspec.drafters.base import DraftContext
from adaspec.drafters.head import HeadDrafter
from adaspec.drafters.hybrid import HeadOrLookup
from adaspec.drafters.ngram import NGramDrafter
from adaspec.drafters.vocab import DraftVocab
from adaspec.config import SamplingConfig
from adaspec.models.hf import HFAdapter
from adaspec.models.tiny import tiny_model
from adaspec.policies.cost import fallback_target_cost
from adaspec.records import Draft


class _Head:
    """A stand-in head that drafts `token` k times, at a price of 0.05 of a target forward."""

    name, vocab_size, forwards, signal_s = "head", 50, 0, 0.0

    def __init__(self, token: int = 7):
        self.token, self.begun, self.commits = token, 0, []

    def priced(self) -> float:
        return 0.05

    def begin(self, prompt):
        self.begun += 1

    def propose(self, seq, max_k, ctx):
        return Draft(tokens=torch.full((max_k,), self.token), probs=None, signals=[], drafter=self.name)

    def commit(self, valid_len):
        self.commits.append(valid_len)


def _hybrid(head=None, **kw) -> HeadOrLookup:
    return HeadOrLookup(head or _Head(), NGramDrafter(50), fallback_target_cost, **kw)


def test_the_head_runs_without_a_match_and_lookup_runs_on_a_long_one():
    h = _hybrid()
    ctx = DraftContext(SamplingConfig())
    h.begin(torch.tensor([1, 2, 3]))
    no_match = torch.tensor([1, 2, 3, 4, 5, 6])
    assert h.choose(no_match, 8)[0] == "head"
    draft = h.propose(no_match, 8, ctx)
    assert draft.drafter == "head" and draft.tokens.tolist() == [7] * 8
    repeated = torch.tensor([10, 11, 12, 13, 14, 15, 16, 10, 11, 12])  # the last 3-gram recurs: 13, 14, 15, ...
    key, k, cont = h.choose(repeated, 8)
    assert key == "ngram:3" and 1 <= k <= 7 and cont.tolist() == [13, 14, 15, 16, 10, 11, 12][:k]
    draft = h.propose(repeated, 8, ctx)
    assert draft.drafter == "ngram" and draft.probs is None and draft.tokens.tolist() == cont.tolist()
    h.commit(len(repeated))  # nothing of the lookup's draft accepted: the committed length is final
    assert h.head.commits == [len(repeated)]  # the head forgets what it did not see either way
    assert h.chosen == {"head": 1, "lookup": 1}


def test_rejected_lookups_hand_the_steps_back_to_the_head():
    h = _hybrid()
    seq = torch.tensor([10, 11, 12, 13, 14, 15, 16, 10, 11, 12])
    prior = h.estimate("ngram:3")
    for _ in range(12):  # every lookup draft rejected at its first token
        key, k, _ = h.choose(seq, 8)
        if key == "head":
            break
        h.propose(seq, 8, DraftContext(SamplingConfig()))
        h.commit(len(seq))
    assert key == "head"
    assert h.estimate("ngram:3") < prior
    # and accepted lookups raise the estimate again
    low = h.estimate("ngram:3")
    h._pending = ("ngram:3", len(seq), 4)
    h.commit(len(seq) + 4)
    assert h.estimate("ngram:3") > low


def test_a_confident_head_keeps_the_steps_a_short_match_would_take():
    seq = torch.tensor([5, 6, 9, 8, 6])  # the last 1-gram (6) recurs
    assert _hybrid(head_prior=0.9).choose(seq, 8)[0] == "head"
    assert _hybrid(head_prior=0.05).choose(seq, 8)[0] == "ngram:1"


def test_greedy_output_equals_plain_decoding_with_lookups_taken():
    target = HFAdapter(_model("qwen2", 0), "t")
    engine = Engine(target)
    engine.use_head(HeadDrafter(_head(target), target, _vocab(target, 150)), cost=0.05)
    chunk = _ids(30, 3).tolist()
    prompt = chunk * 3  # a prompt that repeats itself, as summaries quote their text
    ar = engine.generate(prompt, method="ar", max_new_tokens=40, ignore_eos=True)
    spec = engine.generate(prompt, method="head-lookup", max_new_tokens=40, ignore_eos=True)
    assert spec.token_ids == ar.token_ids
    used = spec.stats.drafters_used
    assert used.get("ngram", 0) > 0 and used.get("head", 0) > 0, used


def test_sampled_output_follows_the_target_with_lookups_and_the_head():
    target = tiny_model(seed=1, dtype=torch.float32, vocab_size=5, n_embd=16, n_head=2)
    head = HeadDrafter(_head(target, intermediate=16), target, DraftVocab(torch.tensor([0, 2, 3]), 5), fast=False)
    head.price = 0.05
    # a low prior on the head: on 5 tokens most steps find a match, and both options must run
    hybrid = HeadOrLookup(head, NGramDrafter(5), fallback_target_cost, head_prior=0.3)
    check_follows_the_target(target, hybrid)
    assert hybrid.chosen["head"] > 0 and hybrid.chosen["lookup"] > 0, hybrid.chosen
