"""Continuous batching (batching.py, FastDecoder.extend_batch): a row's logits do not depend on the
other rows of a forward, so every request decodes the same tokens alone and among others, whoever
joins or leaves and however long the other prompts are; admission is bounded and cancellation
frees a slot at once; the load-aware caps shrink speculation as the batch grows."""

from __future__ import annotations

import pytest
import torch
from test_fast import _ids, _model

from adaspec.api import Engine, make_config
from adaspec.batching import BatchSettings, Batcher, can_batch, generate_batch, load_aware_caps
from adaspec.config import AdaspecError
from adaspec.models.fast import FastDecoder, SlotView
from adaspec.models.hf import HFAdapter
from adaspec.models.invariant import MAX_ROWWISE
from adaspec.models.quant import quantize_adapter
from adaspec.models.tiny import tiny_model


@pytest.fixture(scope="module")
def engine():
    target = quantize_adapter(HFAdapter(_model("qwen2", 0, layers=2), "t"), "int8")
    drafter_model = quantize_adapter(HFAdapter(_model("qwen2", 0, layers=1), "d"), "int8").model
    return Engine(target, FastDecoder(drafter_model, "d", exact_rows=False))


def _cfg(method="fixed", **kw):
    return make_config(method, **{"max_new_tokens": 24, "ignore_eos": True, "k": 3, **kw})


def test_a_batched_forward_gives_each_sequence_its_own_logits_bit_for_bit(engine):
    runtime = FastDecoder(engine.target.model, "t", exact_rows=True)
    feeds = [_ids(5, 1), _ids(MAX_ROWWISE + 9, 2), _ids(1, 3), _ids(12, 4)]
    alone = []
    for ids in feeds:
        view = SlotView(runtime)
        view.extend(_ids(7, 9))  # some context first
        alone.append(view.extend(ids))
    views = [SlotView(runtime) for _ in feeds]
    for v in views:
        v.extend(_ids(7, 9))
    together = runtime.extend_batch([v.slot for v in views], feeds, logits=[True, True, False, True])
    for a, b, want in zip(alone, together, [True, True, False, True]):
        assert (b is None) if not want else torch.equal(a, b)


def test_greedy_requests_decode_the_same_tokens_alone_and_among_seven_others(engine):
    prompts = [_ids(10 + 13 * i, i).tolist() for i in range(8)]
    methods = ["ar", "fixed", "cmasd", "multi-draft", "ngram", "fixed", "cmasd-k", "ar"]
    cfgs = [_cfg(m) for m in methods]
    together = generate_batch(engine, prompts, cfgs)
    for prompt, cfg, r in zip(prompts, cfgs, together):
        alone = generate_batch(engine, [prompt], [cfg])[0]
        assert r.token_ids == alone.token_ids
        assert len(r.token_ids) == 24
    # and what the plain engine (transformers forward, row-wise attention) decodes
    plain = [engine.generate(p, method="ar", max_new_tokens=24, ignore_eos=True).token_ids for p in prompts[:3]]
    assert [r.token_ids for r in together[:1]] == plain[:1]
    assert together[1].token_ids == plain[1]  # speculative == plain decoding, batched


def test_sampled_requests_are_reproducible_with_their_seed_whatever_else_runs(engine):
    prompts = [_ids(9 + i, 20 + i).tolist() for i in range(4)]
    cfgs = [_cfg("fixed", temperature=1.0, seed=100 + i) for i in range(4)]
    together = generate_batch(engine, prompts, cfgs)
    for prompt, cfg, r in zip(prompts, cfgs, together):
        assert generate_batch(engine, [prompt], [cfg])[0].token_ids == r.token_ids


def test_requests_join_and_leave_between_steps_and_long_prompts_prefill_in_chunks(engine):
    settings = BatchSettings(max_batch=4, prefill_chunk=16, max_rows=40)
    batcher = Batcher(engine, settings)
    short = batcher.admit(_ids(6, 1).tolist(), _cfg(max_new_tokens=8))
    for _ in range(3):
        batcher.step()
    long_prompt = _ids(70, 2).tolist()  # 69 tokens to prefill: 5 chunks of at most 16
    late = batcher.admit(long_prompt, _cfg())
    steps_to_decode = 0
    while not late.decoding:
        batcher.step()
        steps_to_decode += 1
        assert batcher.last_rows <= settings.max_rows or steps_to_decode == 1
    assert steps_to_decode == 5
    while batcher.running:
        batcher.step()
    assert short.run.done and late.run.done
    assert short.run.result().token_ids == generate_batch(engine, [_ids(6, 1).tolist()], [_cfg(max_new_tokens=8)])[0].token_ids
    assert late.run.result().token_ids == generate_batch(engine, [long_prompt], [_cfg()], settings)[0].token_ids


def test_admission_is_bounded_and_a_cancelled_request_frees_its_slot(engine):
    batcher = Batcher(engine, BatchSettings(max_batch=2, max_kv_tokens=100))
    a = batcher.admit([5, 6, 7], _cfg(max_new_tokens=20))
    batcher.admit([5, 6, 8], _cfg(max_new_tokens=20))
    assert not batcher.room_for(3, _cfg(max_new_tokens=20))
    with pytest.raises(AdaspecError, match="no room: 2 of 2 sequences"):
        batcher.admit([1, 2], _cfg())
    batcher.step()
    batcher.cancel(a)
    assert batcher.room_for(3, _cfg(max_new_tokens=20))
    assert not batcher.room_for(3, _cfg(max_new_tokens=90))  # 23 + 93 > 100 tokens
    with pytest.raises(AdaspecError, match="max_batch must be an integer >= 1"):
        Batcher(engine, BatchSettings(max_batch=0))


def test_the_head_and_models_the_runtime_cannot_run_are_refused_with_the_way_out(engine):
    from adaspec.drafters.head import DraftHead, HeadConfig, HeadDrafter
    from adaspec.drafters.vocab import DraftVocab

    with_head = Engine(engine.target, engine.drafter)
    head = DraftHead(HeadConfig.for_target(engine.target.model, 32))
    with_head.use_head(HeadDrafter(head, engine.target, DraftVocab(torch.arange(engine.target.vocab_size),
                                                                   engine.target.vocab_size)))
    for method in ("head", "head-lookup"):
        with pytest.raises(AdaspecError, match="one request at a time.*--max-batch 1"):
            Batcher(with_head).admit([1, 2, 3], _cfg(method))
    assert "cannot run on the batched runtime" in can_batch(Engine(tiny_model(seed=0)))
    with pytest.raises(AdaspecError, match="--max-batch 1"):
        Batcher(Engine(tiny_model(seed=0)))


def test_load_aware_caps_shrink_speculation_as_the_batch_grows():
    steep = lambda n: 1.0 + 0.25 * (n - 1)  # a forward's cost grows a quarter per row  # noqa: E731
    alone = load_aware_caps([0.8], [8], steep, 0.05)
    assert alone[0] >= 2
    crowd = load_aware_caps([0.8] * 8, [8] * 8, steep, 0.05)
    assert sum(crowd) < 8 * alone[0] and max(crowd) <= alone[0]
    assert load_aware_caps([0.05] * 4, [8] * 4, steep, 0.05) == [0, 0, 0, 0]  # a drafter that is never right
    flat = lambda n: 1.0  # noqa: E731
    assert load_aware_caps([0.9, 0.2], [4, 4], flat, 0.0) == [4, 4]  # free rows and free drafts: draft all


def test_batched_drafting_prices_rounds_not_tokens():
    """Drafting together, a round of drafter forwards costs about one forward whatever the number
    of sequences in it, so a crowd keeps drafting where drafting alone would stop."""
    gentle = lambda n: 1.0 + 0.02 * (n - 1)  # noqa: E731
    for rates in ([0.7], [0.3]):  # one sequence: a round is its own forward either way
        assert load_aware_caps(rates, [8], gentle, 0.3) == load_aware_caps(rates, [8], gentle, 0.3, batched_drafts=True)
    alone = load_aware_caps([0.7] * 8, [8] * 8, gentle, 0.3)
    together = load_aware_caps([0.7] * 8, [8] * 8, gentle, 0.3, batched_drafts=True)
    assert sum(together) > sum(alone) and min(together) >= 1
    assert load_aware_caps([0.02] * 4, [8] * 4, gentle, 0.3, batched_drafts=True) == [0, 0, 0, 0]


def test_greedy_sequences_draft_in_one_forward_per_round_and_sampled_ones_alone(engine, monkeypatch):
    batched: list[int] = []  # sequences per drafter forward
    original = engine.drafter.extend_batch

    def counting(slots, ids, logits=None):
        batched.append(len(slots))
        return original(slots, ids, logits)

    monkeypatch.setattr(engine.drafter, "extend_batch", counting)
    prompts = [_ids(8 + i, 40 + i).tolist() for i in range(4)]
    greedy = generate_batch(engine, prompts, [_cfg("fixed")] * 4)
    assert max(batched) == 4  # four greedy sequences drafting together
    monkeypatch.setattr(engine.drafter, "extend_batch", original)
    assert [r.token_ids for r in greedy] == [generate_batch(engine, [p], [_cfg("fixed")])[0].token_ids for p in prompts]
    batched.clear()
    monkeypatch.setattr(engine.drafter, "extend_batch", counting)
    generate_batch(engine, prompts, [_cfg("fixed", temperature=1.0, seed=i) for i in range(4)])
    assert batched and max(batched) == 1  # each sampled sequence drafts on its own
    batched.clear()  # --no-batch-drafts, with drafting priced free so that every sequence drafts
    batcher = Batcher(engine, BatchSettings(batch_drafts=False))
    batcher.drafter_ms = 0.0
    seqs = [batcher.admit(p, _cfg("fixed")) for p in prompts]
    while batcher.running:
        batcher.step()
    alone = [s.run.result() for s in seqs]
    assert all(r.stats.drafted > 0 for r in alone)
    assert batched and max(batched) == 1 and [r.token_ids for r in alone] == [r.token_ids for r in greedy]


def _run(batcher, prompts, cfgs):
    seqs = [batcher.admit(p, c) for p, c in zip(prompts, cfgs)]
    while batcher.running:
        batcher.step()
    return [s.run.result().token_ids for s in seqs]


def test_the_shared_opening_is_prefilled_once_then_copied_and_decodes_the_same_tokens(engine, monkeypatch):
    head = _ids(MAX_ROWWISE + 12, 7).tolist()  # a prefill chunk of its own, one causal attention call
    prompts = [head + _ids(5 + 9 * i, 20 + i).tolist() for i in range(4)] + [_ids(15, 30).tolist()]
    cfgs = [_cfg(m) for m in ("ar", "fixed", "cmasd", "ar", "fixed")]
    monkeypatch.setattr(engine, "template_head", lambda: head)
    batcher = Batcher(engine)
    first = _run(batcher, prompts[:1], cfgs[:1])  # computes the opening and keeps it
    assert batcher.head_hits == 0 and batcher._head_kv is not None
    seq = batcher.admit(prompts[1], cfgs[1])
    assert seq.prefilled == len(head) and seq.view.slot.length == len(head)  # copied, not computed
    batcher.cancel(seq)
    together = _run(batcher, prompts, cfgs)
    assert batcher.head_hits == 5  # every prompt that opens with it, the cancelled one included; not the last
    alone = [_run(Batcher(engine), [p], [c])[0] for p, c in zip(prompts, cfgs)]  # each computes its opening
    assert together == alone and together[0] == first[0]
    assert all(len(t) == 24 for t in together)


def test_without_a_shared_opening_or_with_the_cache_off_nothing_is_split(engine, monkeypatch):
    monkeypatch.setattr(engine, "template_head", lambda: _ids(12, 7).tolist())
    off = Batcher(engine, BatchSettings(prefix_cache=False))
    assert off.head == ()
    long = Batcher(engine, BatchSettings(prefill_chunk=8, max_rows=16))
    assert long.head == ()  # an opening longer than a prefill chunk is not split off
    assert Batcher(engine).head == tuple(_ids(12, 7).tolist())
