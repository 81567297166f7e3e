"""The draft head (drafters/head.py) and its training (training/head.py): the target's features by
position, greedy output identical to plain decoding with the head alone and in the pool, sampling
exact in distribution, the training passes computing what the drafting loop computes, head files
refused for another target or when damaged, and `adaspec train-head` end to end and resumed."""

from __future__ import annotations


import pytest
import torch
from test_decode import check_follows_the_target
from test_fast import _ids, _model

from adaspec.api import Engine
from adaspec.cli import main
from adaspec.config import AdaspecError
from adaspec.drafters.head import DraftHead, HeadCache, HeadConfig, HeadDrafter, HeadFile, load_head_drafter, target_key
from adaspec.drafters.vocab import DraftVocab
from adaspec.models.features import FeatureTap, tap
from adaspec.models.hf import HFAdapter
from adaspec.models.quant import quantize_adapter
from adaspec.models.tiny import tiny_model
from adaspec.training.head import TrainSettings, unrolled


def _head(target, seed: int = 0, intermediate: int = 96) -> DraftHead:
    torch.manual_seed(seed)
    return DraftHead(HeadConfig.for_target(target.model, intermediate)).eval()


def _vocab(target, n: int) -> DraftVocab:
    keep = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(0))[:n]
    ids = torch.tensor(sorted(set(keep.tolist()) | set(target.eos_token_ids)))
    return DraftVocab(ids, target.vocab_size)


def test_the_tap_holds_the_final_hidden_state_by_position_through_rollback():
    model = _model("qwen2", 0)
    adapter = HFAdapter(model, "t")
    features = FeatureTap(adapter)
    ids = _ids(90)
    adapter.extend(ids[:70])  # a prefill
    adapter.extend(ids[70:75])  # a verification forward
    with torch.no_grad():
        ref = model.model(input_ids=ids[None, :75]).last_hidden_state[0]
    torch.testing.assert_close(features.features(0, 75), ref, rtol=1e-4, atol=1e-4)
    adapter.rollback(72)
    adapter.extend(ids[80:83])  # other tokens at positions 72..74 overwrite the old rows
    with torch.no_grad():
        ref = model.model(input_ids=torch.cat([ids[:72], ids[80:83]])[None]).last_hidden_state[0]
    torch.testing.assert_close(features.features(70, 75), ref[70:75], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cache holds 75"):
        features.features(0, 76)
    assert tap(adapter) is tap(adapter)
    adapter.reset()
    adapter.absorb(ids[:80])  # a prefill without logits still records every position
    with torch.no_grad():
        ref = model.model(input_ids=ids[None, :80]).last_hidden_state[0]
    torch.testing.assert_close(features.features(0, 80), ref, rtol=1e-4, atol=1e-4)
    model(input_ids=ids[None, :5])  # another caller of the same model leaves the rows alone
    torch.testing.assert_close(features.features(0, 5), ref[:5], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["head", "multi-draft"])
@pytest.mark.parametrize("quant", [None, "int8"])
def test_greedy_output_equals_plain_decoding(method, quant):
    target = HFAdapter(_model("qwen2", 0), "t")
    if quant:
        quantize_adapter(target, quant)
    engine = Engine(target)
    # priced, not timed: a measured price on a loaded machine could keep the pool off the head
    engine.use_head(HeadDrafter(_head(target), target, _vocab(target, 150)), pool=True, cost=0.05)
    for seed in (1, 2):
        prompt = _ids(20 + 60 * seed, seed).tolist()  # one short prompt, one prefilled
        ar = engine.generate(prompt, method="ar", max_new_tokens=40, ignore_eos=True)
        spec = engine.generate(prompt, method=method, max_new_tokens=40, ignore_eos=True)
        assert spec.token_ids == ar.token_ids
        assert spec.stats.drafted > 0 or method == "multi-draft"
    assert engine.head.forwards > 0


def test_sampled_output_follows_the_target_with_a_head():
    target = tiny_model(seed=1, dtype=torch.float32, vocab_size=5, n_embd=16, n_head=2)
    drafter = HeadDrafter(_head(target, intermediate=16), target, DraftVocab(torch.tensor([0, 2, 3]), 5), fast=False)
    check_follows_the_target(target, drafter)


def test_the_training_passes_compute_what_drafting_computes():
    """Pass 2 of training at position j must equal the head's second drafting step from a cache
    holding the real entries 0..j-1; pass 3 its third step."""
    torch.manual_seed(0)
    head = DraftHead(HeadConfig(hidden=32, n_heads=4, n_kv=2, head_dim=8, intermediate=48)).eval()
    T = 12
    embeds, feats = torch.randn(1, T + 1, 32), torch.randn(1, T + 1, 32)
    with torch.no_grad():
        outs = unrolled(head, embeds, feats, passes=3)
        for j in (2, 5, 9):
            cache = HeadCache()
            g = head(embeds[:, 1 : j], feats[:, : j - 1], 0, cache)[:, -1:]  # real entries 0..j-2: step 1 at j-2
            torch.testing.assert_close(g[0, 0], outs[0][0, j - 2], rtol=1e-5, atol=1e-5)
            g = head(embeds[:, j : j + 1], g, j - 1, cache)  # step 2 at entry j-1
            torch.testing.assert_close(g[0, 0], outs[1][0, j - 1], rtol=1e-5, atol=1e-5)
            g = head(embeds[:, j + 1 : j + 2], g, j, cache)  # step 3 at entry j
            torch.testing.assert_close(g[0, 0], outs[2][0, j], rtol=1e-5, atol=1e-5)


def test_a_head_file_round_trips_and_is_refused_for_another_target(tmp_path):
    target = HFAdapter(_model("qwen2", 0), "t")
    head = _head(target)
    vocab = _vocab(target, 100)
    path = tmp_path / "h.safetensors"
    sha = HeadFile(head.cfg, head.state_dict(), vocab, "t", target_key(target.model), {"steps": 1}).save(path)
    assert len(sha) == 64
    loaded = load_head_drafter(path, target, fast=False)
    assert torch.equal(loaded.draft_ids, vocab.ids)
    for name, value in head.state_dict().items():
        torch.testing.assert_close(loaded.head.state_dict()[name], value.half().float())
    other = HFAdapter(_model("qwen2", 5), "other")
    with pytest.raises(AdaspecError, match="trained for 't', not for 'other'.*train-head"):
        load_head_drafter(path, other)
    damaged = tmp_path / "bad.safetensors"
    damaged.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(AdaspecError, match="not a readable adaspec draft head.*train-head"):
        load_head_drafter(damaged, target)
    with pytest.raises(AdaspecError, match="no draft head at"):
        load_head_drafter(tmp_path / "missing.safetensors", target)


def test_an_engine_checks_a_head_file_at_once_and_builds_its_drafter_at_first_use(tmp_path):
    target = HFAdapter(_model("qwen2", 0), "t")
    head = _head(target)
    path = tmp_path / "h.safetensors"
    HeadFile(head.cfg, head.state_dict(), _vocab(target, 100), "t", target_key(target.model), {"steps": 1}).save(path)
    with pytest.raises(AdaspecError, match="trained for 't', not for 'other'"):  # refused when given, not later
        Engine(HFAdapter(_model("qwen2", 5), "other")).use_head(path)
    engine = Engine(target)
    engine.use_head(path)
    assert engine._head is None  # nothing built at load: the int8 copy and the feature tap wait for a use
    ar = engine.generate([1, 2, 3], method="ar", max_new_tokens=12)
    assert engine._head is None
    assert engine.generate([1, 2, 3], method="head", max_new_tokens=12).token_ids == ar.token_ids
    assert isinstance(engine._head, HeadDrafter) and engine.head is engine._head  # built once, then kept


def test_the_head_method_without_a_head_says_what_to_do():
    engine = Engine(tiny_model(seed=0))
    with pytest.raises(AdaspecError, match="needs a draft head.*train-head"):
        engine.generate([1, 2, 3], method="head", max_new_tokens=4)


def test_train_head_trains_resumes_and_its_head_keeps_output_identical(tmp_path, capsys):
    out = tmp_path / "head.safetensors"
    args = ["train-head", "--target", "tiny", "--out", str(out), "--max-sequences", "24", "--held-out", "4",
            "--piece-tokens", "80", "--vocab", "200", "--eval-every", "5", "--save-every", "5", "--batch", "2",
            "--intermediate", "64"]
    assert main(args + ["--steps", "5"]) == 0
    assert out.is_file()
    assert main(args + ["--steps", "12"]) == 0  # the same work folder: resumes at step 5
    printed = capsys.readouterr()
    assert "resumed at step 5" in printed.out + printed.err
    curve = [line for line in (tmp_path / "head.work" / "curve.jsonl").read_text().splitlines()]
    assert len(curve) == 12
    assert (tmp_path / "head.work" / "curve.png").stat().st_size > 1000
    stored = HeadFile.load(out)
    assert stored.info["steps"] == 12 and stored.info["held_out_top1"]
    engine = Engine(tiny_model(seed=0, dtype=torch.float32))
    engine.use_head(out)
    ar = engine.generate([72, 101, 108, 108, 111], method="ar", max_new_tokens=30, ignore_eos=True)
    spec = engine.generate([72, 101, 108, 108, 111], method="head", max_new_tokens=30, ignore_eos=True)
    assert spec.token_ids == ar.token_ids and spec.stats.drafted > 0


def test_training_learns_the_targets_next_token(tmp_path):
    """On the toy target, a few hundred steps lift the head's held-out top-1 agreement with the
    target well above the untrained head's."""
    from adaspec.models.tiny import ByteTokenizer
    from adaspec.training import head as training

    target = tiny_model(seed=0, dtype=torch.float32)
    settings = TrainSettings(piece_tokens=80, max_sequences=60, held_out=8, steps=150, batch=4, eval_every=150,
                             save_every=1000, intermediate=64, lr=2e-3, warmup=10, vocab=259)
    rows = training.load_shards(training.extract(target, training.corpus(ByteTokenizer(), settings),
                                                 tmp_path / "f", settings))
    vocab = DraftVocab(torch.arange(259), 259)
    untrained = training.train(target, rows, vocab, tmp_path / "w0", TrainSettings(**{**settings.__dict__, "steps": 1,
                                                                                      "eval_every": 1}), "tiny")
    trained = training.train(target, rows, vocab, tmp_path / "w1", settings, "tiny")
    before, after = untrained.info["held_out_top1"][0]["top1"], trained.info["held_out_top1"][0]["top1"]
    assert after > before + 0.2, (before, after)


def test_the_shipped_head_is_whole_small_and_for_the_default_target():
    from adaspec.api import DEFAULT_TARGET, SHIPPED_HEADS, shipped_head

    path = shipped_head(DEFAULT_TARGET)  # checks the file against its recorded sha256
    assert path is not None and path.stat().st_size <= 50 * 1024 * 1024
    stored = HeadFile.load(path)
    assert stored.target == DEFAULT_TARGET and stored.vocab.vocab_size == 151936
    assert stored.info["steps"] > 0 and stored.info["held_out_top1"]
    assert SHIPPED_HEADS[DEFAULT_TARGET][0] == path.name
    # kept as stored (half the memory of float32 until the head is built), built in float32
    assert {t.dtype for t in stored.state.values()} == {torch.float16}
    assert {p.dtype for p in stored.build().parameters()} == {torch.float32}
    assert shipped_head("tiny") is None


def test_a_damaged_shipped_head_is_refused_with_the_way_out(monkeypatch):
    from adaspec import api

    name, _ = api.SHIPPED_HEADS[api.DEFAULT_TARGET]
    monkeypatch.setitem(api.SHIPPED_HEADS, api.DEFAULT_TARGET, (name, "0" * 64))
    with pytest.raises(AdaspecError, match="missing or damaged: reinstall adaspec, or pass head=False"):
        api.shipped_head(api.DEFAULT_TARGET)


def test_a_head_is_priced_once_and_a_given_price_is_kept(monkeypatch):
    target = HFAdapter(_model("qwen2", 0), "t")
    head = HeadDrafter(_head(target), target, _vocab(target, 150))
    measured = []
    monkeypatch.setattr(head, "relative_cost", lambda: measured.append(1) or 0.07)
    assert head.priced() == head.priced() == 0.07 and len(measured) == 1
    engine = Engine(target)
    engine.use_head(HeadDrafter(_head(target), target, _vocab(target, 150)), cost=0.03)
    assert engine.head.priced() == 0.03  # what method "head" and the pool price it at


def test_a_head_priced_at_zero_or_less_is_refused():
    target = HFAdapter(_model("qwen2", 0), "t")
    engine = Engine(target)
    with pytest.raises(AdaspecError, match="positive fraction"):
        engine.use_head(HeadDrafter(_head(target), target, _vocab(target, 150)), pool=True, cost=0)
