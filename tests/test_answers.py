"""The target's own answers as head training data (training/answers.py): ShareGPT read past a torn
end, evaluation prompts kept out, greedy answers made many at once equal to plain decoding with the
rows a teacher-forced forward gives, shards resumed, and `adaspec train-head --answers` end to end
(starting from an existing head with --init)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from adaspec.cli import main
from adaspec.config import AdaspecError
from adaspec.drafters.head import HeadFile
from adaspec.models.fast import FastDecoder
from adaspec.models.tiny import ByteTokenizer
from adaspec.training import answers
from adaspec.models.features import tap
from adaspec.training.answers import answer, chat_prompts, done_prompts, read_sharegpt
from adaspec.training.head import load_shards

V = 259  # ByteTokenizer's ids


def _target(seed: int = 0) -> FastDecoder:
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=1024, bos_token_id=1,
                      eos_token_id=ByteTokenizer.eos_token_id, tie_word_embeddings=True)
    target = FastDecoder(Qwen2ForCausalLM(cfg).eval(), "tiny-qwen2")
    target.eos_token_ids = []  # answers run to answer_tokens unless a test sets an end-of-sequence id
    return target


def _conversation(first: str, opener: str = "human") -> dict:
    return {"id": first[:8], "conversations": [{"from": opener, "value": first}, {"from": "gpt", "value": "ok"}]}


def _sharegpt(path, records: list[dict], torn: bool = True):
    text = json.dumps(records)
    if torn:  # as the packaged file: cut in the middle of one more record
        text = text[:-1] + ', {"id": "x", "conversations": [{"from": "human", "value": "cut he'
    path.write_text(text)
    return path


def test_sharegpt_is_read_record_by_record_and_a_torn_end_is_dropped(tmp_path):
    records = [_conversation(f"question number {i}") for i in range(3)]
    assert read_sharegpt(_sharegpt(tmp_path / "torn.json", records)) == records
    assert read_sharegpt(_sharegpt(tmp_path / "whole.json", records, torn=False)) == records
    (tmp_path / "bad.json").write_text('{"not": "an array"}')
    with pytest.raises(AdaspecError, match="not a ShareGPT file"):
        read_sharegpt(tmp_path / "bad.json")


def test_prompts_leave_out_evaluation_text_repeats_other_openers_and_long_ones(tmp_path):
    from adaspec.bench.datasets import load_gsm8k, load_spec_bench

    spec = load_spec_bench(limit_per_subtask=1)[0].prompt
    gsm = load_gsm8k(limit=1)[0].prompt
    records = [_conversation(f"Tell me about topic {i}.") for i in range(6)]
    records += [_conversation("Please answer: " + spec), _conversation(gsm + " Thanks!"),
                _conversation("Tell me about topic 1."),  # a repeat
                _conversation("I am the model speaking first", opener="gpt"), _conversation("x" * 400)]
    source = _sharegpt(tmp_path / "sg.json", records)
    tok = ByteTokenizer()
    prompts = chat_prompts(tok, 6, prompt_tokens=200, source=source)
    texts = {tok.decode(p) for p in prompts}
    assert len(prompts) == 6 and len(set(map(tuple, prompts))) == 6
    assert all(any(f"Tell me about topic {i}." in t for t in texts) for i in range(6))
    assert chat_prompts(tok, 3, prompt_tokens=200, source=source) == prompts[:3]  # a prefix of the same order
    with pytest.raises(AdaspecError, match="only 6 usable chat prompts"):
        chat_prompts(tok, 7, prompt_tokens=200, source=source)


def test_batched_answers_are_greedy_decoding_with_teacher_forced_rows(tmp_path):
    target = _target()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V - 3, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 12)]
    shards = answer(target, prompts, tmp_path, answer_tokens=24, batch=3, top_k=4, shard_size=2)
    rows = {r["prompt"]: r for r in load_shards(shards)}
    assert sorted(rows) == list(range(5)) and len(shards) == 3  # 2 + 2 + 1
    single = _target()
    tapped = tap(single)  # before its first forward: the tap records the forwards it wraps
    for i, ids in enumerate(prompts):
        row = rows[i]
        n = row["ids"].numel()
        assert row["prompt_len"] == len(ids) and row["ids"][: len(ids)].tolist() == ids
        # greedy: every fed answer token is the top-1 of the row before it, and the answer is as long as asked
        assert row["ids"][len(ids):].tolist() == row["top_ids"][len(ids) - 1 : n - 1, 0].tolist()
        assert n - len(ids) == 24 - 1  # the 24th token was chosen, not fed
        # the rows are those of one teacher-forced forward over the same tokens
        single.reset()
        logits = single.extend(row["ids"].long())
        top = torch.log_softmax(logits, -1).topk(4, dim=-1)
        feats = tapped.features(0, n)
        torch.testing.assert_close(row["feats"].float(), feats, rtol=2e-3, atol=2e-3)
        assert torch.equal(row["top_ids"][:, 0].long(), top.indices[:, 0])
        torch.testing.assert_close(row["top_logp"].float(), top.values, rtol=2e-3, atol=2e-3)


def test_an_answer_ends_at_the_targets_end_of_sequence(tmp_path):
    target = _target()
    prompt = [5, 6, 7, 8]
    first = int(target.extend(torch.tensor(prompt)).argmax(-1)[-1])
    target.reset()
    target.eos_token_ids = [first]
    (row,) = load_shards(answer(target, [prompt], tmp_path, answer_tokens=50, batch=2, top_k=2, shard_size=5))
    assert row["ids"].tolist() == prompt and row["top_ids"][-1, 0] == first


def test_answering_resumes_from_its_shards(tmp_path, monkeypatch):
    prompts = [[5 + i, 6, 7] for i in range(4)]
    answer(_target(), prompts[:2], tmp_path, answer_tokens=6, batch=2, top_k=2, shard_size=2)
    assert done_prompts(tmp_path) == {0, 1}
    target = _target()
    fed: list[int] = []
    original = target.extend_batch
    monkeypatch.setattr(target, "extend_batch", lambda slots, ids, **kw: fed.extend(map(len, ids)) or original(slots, ids, **kw))
    answer(target, prompts, tmp_path, answer_tokens=6, batch=2, top_k=2, shard_size=2)
    assert done_prompts(tmp_path) == {0, 1, 2, 3}
    assert sum(fed) == 2 * (3 + 5)  # only prompts 2 and 3: 3 prompt rows and 5 fed answer tokens each
    # what was answered is read from the shards' indexes, not from the shards themselves ...
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == \
        ["shard-0000.json", "shard-0000.pt", "shard-0001.json", "shard-0001.pt"]
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a shard was read"))
    assert done_prompts(tmp_path) == {0, 1, 2, 3}
    monkeypatch.undo()
    # ... and a shard whose index is missing or torn is read once and indexed again
    (tmp_path / "shard-0000.json").unlink()
    (tmp_path / "shard-0001.json").write_text("[2, ")
    assert done_prompts(tmp_path) == {0, 1, 2, 3}
    assert json.loads((tmp_path / "shard-0001.json").read_text()) in ([2, 3], [3, 2])


def test_answers_need_the_fast_runtime(tmp_path):
    from adaspec.models.tiny import tiny_model

    with pytest.raises(AdaspecError, match="fast runtime"):
        answer(tiny_model(), [[5, 6]], tmp_path, answer_tokens=4, batch=1, top_k=2, shard_size=1)


def test_train_head_on_the_targets_answers_from_an_existing_head(tmp_path, monkeypatch, capsys):
    """`adaspec train-head --answers N --init FILE` on a tiny Qwen2 with the byte tokenizer (the
    installed ShareGPT package supplies the prompts): answers, trains, and starts from the head."""
    import adaspec.api

    monkeypatch.setattr(adaspec.api, "load_model", lambda name, **kw: (_target(), ByteTokenizer()))
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["train-head", "--target", "tiny-qwen2", "--answers", "6", "--answer-tokens", "12",
              "--prompt-tokens", "300", "--answer-batch", "3", "--max-sequences", "0", "--held-out", "2",
              "--vocab", "200", "--batch", "2", "--intermediate", "64", "--eval-every", "4", "--steps", "4"]
    assert main(common + ["--out", str(first)]) == 0
    trained = HeadFile.load(first)
    assert "greedy answers" in trained.info["data"] and "6 ShareGPT" in trained.info["data"]
    # a fresh work folder (a checkpoint there would be resumed instead); a vanishing learning rate
    # leaves the head where it started
    assert main(common + ["--out", str(second), "--init", str(first), "--lr", "1e-12", "--warmup", "1"]) == 0
    capsys.readouterr()
    tuned = HeadFile.load(second)
    assert tuned.info["started_from"]["steps"] == 4
    assert tuned.vocab.ids.tolist() == trained.vocab.ids.tolist()
    assert tuned.state.keys() == trained.state.keys()
    for name, weight in trained.state.items():
        torch.testing.assert_close(tuned.state[name], weight, rtol=1e-3, atol=1e-3)


def test_a_head_for_another_target_is_not_a_starting_point(tmp_path):
    from adaspec.drafters.head import DraftHead, HeadConfig
    from adaspec.drafters.vocab import DraftVocab
    from adaspec.training import head as training

    other, target = _target(seed=1), _target(seed=2)
    vocab = DraftVocab(torch.arange(V), V)
    cfg = HeadConfig.for_target(other.model, 64)
    stored = HeadFile(cfg, DraftHead(cfg).state_dict(), vocab, "other", training.target_key(other.model), {})
    rows = load_shards(answer(target, [[5, 6, 7]] * 3, tmp_path / "a", answer_tokens=5, batch=3, top_k=2,
                                    shard_size=3))
    with pytest.raises(AdaspecError, match="trained for other"):
        training.train(target, rows, vocab, tmp_path / "w", training.TrainSettings(held_out=1, steps=1), "t",
                       init=stored)


def test_an_answer_is_scored_from_the_row_that_predicts_its_first_token():
    from adaspec.drafters.vocab import DraftVocab
    from adaspec.training.head import Frozen, batch_of

    target = _target()
    frozen = Frozen.of(target.model, DraftVocab(torch.arange(V), V))
    row = {"ids": torch.arange(10, 20, dtype=torch.int32), "feats": torch.zeros(10, 64, dtype=torch.float16),
           "top_ids": torch.zeros(10, 2, dtype=torch.int32), "top_logp": torch.zeros(10, 2, dtype=torch.float16)}
    batch = batch_of([{**row, "prompt_len": 4}, row], frozen)
    assert batch["valid"][0].tolist() == [False] * 3 + [True] * 7  # row 3 predicts the answer's first token
    assert batch["valid"][1].all()  # a corpus piece: every row
