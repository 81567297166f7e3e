"""A pruned drafting vocabulary (drafters/vocab.py): the drafter proposes only among the kept ids,
its cut head scores exactly what the full head scores on those rows, and what is generated does
not change: greedy output equals plain decoding, sampled output follows the target's distribution."""

from __future__ import annotations

import json

import pytest
import torch
from test_decode import check_follows_the_target
from test_fast import V, _ids, _model

from adaspec.api import Engine, make_config
from adaspec.cli import main
from adaspec.config import AdaspecError
from adaspec.decode import generate_ids
from adaspec.drafters.base import DraftContext, SignalSettings
from adaspec.drafters.model import ModelDrafter
from adaspec.drafters.vocab import DraftVocab, PrunedAdapter, count_tokens, cut_output_head
from adaspec.models.fast import FastDecoder
from adaspec.models.hf import HFAdapter
from adaspec.models.quant import quantize_adapter
from adaspec.models.tiny import ByteTokenizer, perturbed_copy, tiny_model
from adaspec.config import SamplingConfig


def test_the_most_frequent_ids_are_kept_with_the_eos_ids():
    counts = torch.tensor([5, 0, 9, 9, 1, 7])
    assert DraftVocab.from_counts(counts, 3).ids.tolist() == [2, 3, 5]  # ties: the lower id first
    assert DraftVocab.from_counts(counts, 3, always=[1]).ids.tolist() == [1, 2, 3]
    v = DraftVocab.from_counts(counts, 4)
    assert v.coverage(counts) == pytest.approx(30 / 31)
    assert count_tokens(lambda t: [int(c) for c in t], ["0112", "2"], 4).tolist() == [1, 2, 2, 0]
    with pytest.raises(AdaspecError, match="choose 1..6"):
        DraftVocab.from_counts(counts, 7)
    with pytest.raises(AdaspecError, match="sorted, unique"):
        DraftVocab(torch.tensor([3, 1]), 6)


def test_a_vocabulary_file_round_trips_and_a_bad_one_is_named(tmp_path):
    v = DraftVocab(torch.tensor([0, 4, 7]), 9, "test")
    v.save(tmp_path / "v.json")
    back = DraftVocab.load(tmp_path / "v.json")
    assert back.ids.tolist() == [0, 4, 7] and back.vocab_size == 9 and back.source == "test"
    (tmp_path / "bad.json").write_text(json.dumps({"ids": [1]}))
    with pytest.raises(AdaspecError, match="cannot read the drafting vocabulary .*bad.json"):
        DraftVocab.load(tmp_path / "bad.json")


def _byte_vocab(n: int = 120) -> DraftVocab:
    """Printable ASCII and the EOS id: what the toy prompts below are made of."""
    keep = sorted({*range(32, 32 + n - 1), ByteTokenizer.eos_token_id})
    return DraftVocab(torch.tensor(keep), 259)


def test_the_drafter_proposes_only_kept_ids():
    target = tiny_model(seed=0, dtype=torch.float64)
    vocab = DraftVocab(torch.tensor([5, 40, 41, 42, 100]), target.vocab_size)
    drafter = ModelDrafter(PrunedAdapter(perturbed_copy(target, noise=0.3, seed=1), vocab))
    seq = torch.tensor([40, 41, 42, 7])
    drafter.begin(seq)
    ctx = DraftContext(SamplingConfig(temperature=0.0), None, SignalSettings(), lambda i, s: True)
    draft = drafter.propose(seq, 6, ctx)
    assert len(draft.tokens) == 6 and set(draft.tokens.tolist()) <= set(vocab.ids.tolist())
    ctx = DraftContext(SamplingConfig(temperature=1.0), torch.Generator().manual_seed(0), SignalSettings(),
                       lambda i, s: True)
    drafter.begin(seq)
    sampled = drafter.propose(seq, 4, ctx)
    assert sampled.probs.shape == (4, target.vocab_size)  # full-vocabulary distributions, zero elsewhere
    outside = torch.ones(target.vocab_size, dtype=torch.bool)
    outside[vocab.ids] = False
    assert float(sampled.probs[:, outside].abs().max()) == 0.0
    assert torch.allclose(sampled.probs.sum(-1), torch.ones(4, dtype=sampled.probs.dtype))


@pytest.mark.parametrize("method", ["fixed", "cmasd", "entropy", "confidence-stop"])
def test_greedy_output_is_unchanged(method):
    target = tiny_model(seed=0, dtype=torch.float64)
    drafter = PrunedAdapter(perturbed_copy(target, noise=0.1, seed=1), _byte_vocab())
    for prompt in ([72, 101, 108, 108, 111], list(b"def add(a, b):")):
        cfg = make_config(method, max_new_tokens=40, ignore_eos=True)
        ar = generate_ids(target, None, prompt, make_config("ar", max_new_tokens=40, ignore_eos=True))
        spec = generate_ids(target, ModelDrafter(drafter), prompt, cfg)
        assert spec.token_ids == ar.token_ids
        assert spec.stats.accepted > 0  # the pruned drafter still drafts what the target says


def test_sampled_output_follows_the_target_with_a_pruned_drafter():
    target = tiny_model(seed=1, dtype=torch.float64, vocab_size=5, n_embd=16)
    drafter = PrunedAdapter(perturbed_copy(target, noise=1.0, seed=2), DraftVocab(torch.tensor([0, 2, 3]), 5))
    check_follows_the_target(target, ModelDrafter(drafter))


@pytest.mark.parametrize("quant", [None, "int8"])
def test_a_cut_head_scores_the_kept_rows_as_the_full_head_does(quant):
    ids = torch.tensor(sorted(torch.randperm(V, generator=torch.Generator().manual_seed(0))[: V // 3].tolist()))
    full, cut = HFAdapter(_model("qwen2", 3), "full"), HFAdapter(_model("qwen2", 3), "cut")
    assert cut_output_head(cut.model, ids)
    assert cut.model.get_input_embeddings().weight.shape[0] == V  # tied embeddings stay whole
    if quant:
        full, cut = quantize_adapter(full, quant), quantize_adapter(cut, quant)
        full, cut = FastDecoder(full.model, "full", exact_rows=False), FastDecoder(cut.model, "cut", exact_rows=False)
    pruned = PrunedAdapter(cut, DraftVocab(ids, V))
    x = _ids(12)
    want = full.extend(x)[:, ids]
    got = pruned.extend(x)
    assert got.shape == (12, ids.numel())
    if quant:  # int8: per-row scales and exact int32 sums, so the same rows give the same numbers
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, atol=1e-5)
    assert pruned.vocab_size == V and pruned.name == "cut-v" + str(ids.numel())


def test_the_cli_takes_a_vocabulary_size_and_output_stays_identical(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    assert main(["generate", "def f(x):", "--target", "tiny", "--drafter", "tiny-draft", "--draft-vocab", "200",
                 "--max-new-tokens", "12", "--json", "--no-warmup", "--compare"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["identical"]
    assert list((tmp_path / "vocab").glob("token-counts-*.pt"))  # counted once, then cached
    assert main(["generate", "x", "--target", "tiny", "--drafter", "tiny-draft", "--draft-vocab",
                 str(tmp_path / "missing.json"), "--no-warmup"]) == 2
    assert "cannot read the drafting vocabulary" in capsys.readouterr().err


def test_an_engine_refuses_a_vocabulary_for_another_model():
    target = tiny_model(seed=0, dtype=torch.float64)
    with pytest.raises(AdaspecError, match="this drafting vocabulary is for a 7-token vocabulary"):
        Engine(target, PrunedAdapter(target, DraftVocab(torch.tensor([1, 2]), 7)))
