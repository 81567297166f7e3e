"""Model adapters: incremental extends equal one full forward, rollback is exact, errors are clear.

Every adapter is compared with a fresh adapter fed the final sequence in one forward, in float64 so
that a wrong cache entry cannot hide behind rounding. The HF models are random, built from configs
here (no download): a Llama (full attention) and a Mistral with a 4-token sliding window, whose
cache can roll back only as far as its last cut.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from adaspec.config import AdaspecError
from adaspec.models import (
    ByteTokenizer,
    HFAdapter,
    HFTokenizer,
    ModelAdapter,
    Tokenizer,
    load_hf,
    perturbed_copy,
    random_model,
    tiny_model,
)
from adaspec.models.base import absorb

V_HF = 97
ATOL = 1e-10  # float64: pieces and full forwards differ only by summation order


def _hf_config(kind: str, max_len: int = 64):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=V_HF, max_position_embeddings=max_len,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        return LlamaForCausalLM, LlamaConfig(**common)
    return MistralForCausalLM, MistralConfig(sliding_window=4, **common)


_HF_MODELS: dict = {}


def _hf_model(kind: str):
    # one random model per kind, shared: building it is the slow part of these tests
    if kind not in _HF_MODELS:
        cls, config = _hf_config(kind)
        torch.manual_seed(0)
        _HF_MODELS[kind] = cls(config).to(torch.float64).eval()
    return _HF_MODELS[kind]


def make_adapter(kind: str):
    if kind == "tiny":
        return tiny_model(seed=0, dtype=torch.float64, max_len=64)
    return HFAdapter(_hf_model(kind), name=kind)


KINDS = ["tiny", "llama", "mistral-sliding"]


@pytest.fixture(params=KINDS)
def kind(request):
    return "mistral" if request.param == "mistral-sliding" else request.param


def rand_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def vocab_of(kind: str) -> int:
    return 259 if kind == "tiny" else V_HF


def fresh_logits(kind: str, ids: torch.Tensor) -> torch.Tensor:
    return make_adapter(kind).extend(ids)  # (n, V)


# --- extend and rollback -----------------------------------------------------------------------


def test_protocols():
    assert isinstance(tiny_model(), ModelAdapter)
    assert isinstance(make_adapter("llama"), ModelAdapter)
    assert isinstance(ByteTokenizer(), Tokenizer)


def test_extend_in_pieces_equals_one_forward(kind):
    ids = rand_ids(24, vocab_of(kind), seed=1)
    full = fresh_logits(kind, ids)  # (24, V)
    a = make_adapter(kind)
    pieces = [a.extend(ids[s:e]) for s, e in [(0, 1), (1, 6), (6, 7), (7, 14), (14, 24)]]
    assert a.length == 24
    assert full.shape == (24, vocab_of(kind)) and full.dtype == torch.float64
    torch.testing.assert_close(torch.cat(pieces), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("back_to", [20, 19, 5, 0], ids=["by0", "by1", "many", "to0"])
def test_rollback_then_reextend_equals_fresh(kind, back_to):
    a = make_adapter(kind)
    first = rand_ids(20, vocab_of(kind), seed=2)
    other = rand_ids(6, vocab_of(kind), seed=3)  # different tokens after the rollback point
    a.extend(first[:12])
    a.extend(first[12:])
    a.rollback(back_to)
    assert a.length == back_to
    got = a.extend(other)
    want = fresh_logits(kind, torch.cat([first[:back_to], other]))[back_to:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert a.length == back_to + 6


def test_drafter_rolls_back_past_last_accepted_and_extends_two(kind):
    """A drafter has fed prefix + d1..d3 (d4 proposed, not fed). With d1, d2 accepted and a
    correction c, it re-feeds d2 together with c; with all four accepted it feeds d4 and the bonus."""
    vocab = vocab_of(kind)
    prefix, drafts = rand_ids(10, vocab, seed=4), rand_ids(4, vocab, seed=5)
    c, bonus = rand_ids(2, vocab, seed=6)
    p = len(prefix)
    # (length to keep, two tokens to feed): keep prefix + d1 and feed (d2, c); keep all and feed (d4, bonus)
    for keep, tail in [(p + 1, torch.stack([drafts[1], c])), (p + 3, torch.stack([drafts[3], bonus]))]:
        a = make_adapter(kind)
        a.extend(prefix)
        for d in drafts[:3]:
            a.extend(d[None])  # one token per drafter forward
        a.rollback(keep)
        got = a.extend(tail)  # (2, V)
        want = fresh_logits(kind, torch.cat([prefix, drafts[:keep - p], tail]))[-2:]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_random_extend_rollback_walk_matches_fresh(kind):
    """Thirty random extends and rollbacks; after each extend the logits equal a fresh forward."""
    vocab, g = vocab_of(kind), torch.Generator().manual_seed(7)
    a, seq = make_adapter(kind), torch.empty(0, dtype=torch.long)
    for step in range(30):
        if len(seq) and torch.rand((), generator=g) < 0.4:
            back = int(torch.randint(0, len(seq) + 1, (), generator=g))
            a.rollback(back)
            seq = seq[:back]
        n = int(torch.randint(1, 5, (), generator=g))
        if len(seq) + n > 60:
            a.rollback(0)
            seq = seq[:0]
        new = torch.randint(0, vocab, (n,), generator=g)
        got = a.extend(new)
        seq = torch.cat([seq, new])
        torch.testing.assert_close(got, fresh_logits(kind, seq)[-n:], atol=ATOL, rtol=0, msg=f"step {step}")
        assert a.length == len(seq)


def test_sliding_window_rollback_below_last_cut_recomputes():
    a = make_adapter("mistral")
    calls = []
    real = a._recompute
    a._recompute = lambda ids: (calls.append(len(ids)), real(ids))
    ids = rand_ids(16, V_HF, seed=8)
    a.extend(ids[:10])
    a.rollback(8)  # cut: the window layers now hold only the 3 states before position 8
    a.extend(ids[8:11])
    assert calls == []
    a.rollback(6)  # before the cut: only recomputation can be exact
    assert calls == [6]
    torch.testing.assert_close(a.extend(ids[6:16]), fresh_logits("mistral", ids)[6:], atol=ATOL, rtol=0)


class _OldCropCache(DynamicCache):
    """A DynamicCache with transformers 4.x crop semantics: absolute length, where 0 empties."""

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.get_seq_length() - abs(max_length)
        super().crop(max_length - self.get_seq_length())


def test_rollback_with_old_crop_semantics():
    a = make_adapter("llama")
    a._cache_cls, a._crop_counts = _OldCropCache, False
    a.reset()
    ids = rand_ids(12, V_HF, seed=9)
    a.extend(ids[:8])
    a.rollback(8)  # by 0: an absolute crop(0) would have emptied the cache
    a.rollback(5)
    torch.testing.assert_close(a.extend(ids[5:12]), fresh_logits("llama", ids)[5:], atol=ATOL, rtol=0)


def test_installed_crop_takes_a_negative_count():
    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 4)
    cache.update(k, k, layer_idx=0)
    cache.crop(-2)
    assert cache.get_seq_length() == 3
    if int(transformers.__version__.split(".")[0]) >= 5:
        with pytest.raises(ValueError):
            cache.crop(2)  # the old absolute-length form is refused in 5.x


# --- errors ------------------------------------------------------------------------------------


def test_rollback_out_of_range_raises(kind):
    a = make_adapter(kind)
    a.extend(rand_ids(5, vocab_of(kind), seed=10))
    for bad in (-1, 6):
        with pytest.raises(ValueError, match="cannot roll"):
            a.rollback(bad)
    assert a.length == 5


def test_extend_past_context_raises_clearly(kind):
    a = make_adapter(kind)  # every kind here has a 64-token context
    assert a.max_length == 64
    a.extend(rand_ids(60, vocab_of(kind), seed=11))
    with pytest.raises(AdaspecError, match="exceed the context of 64 tokens"):
        a.extend(rand_ids(5, vocab_of(kind), seed=12))
    assert a.length == 60
    a.extend(rand_ids(4, vocab_of(kind), seed=13))  # exactly filling the context is fine
    with pytest.raises(ValueError):
        a.extend(torch.empty(0, dtype=torch.long))


def test_hf_adapter_metadata():
    a = make_adapter("llama")
    assert (a.name, a.vocab_size, a.eos_token_ids, a.max_length) == ("llama", V_HF, (2,), 64)
    assert a.device == torch.device("cpu")


# --- tiny model family -------------------------------------------------------------------------


def test_tiny_models_are_seeded_and_dtype_consistent():
    ids = rand_ids(30, 259, seed=14)
    a, b = tiny_model(seed=3).extend(ids), tiny_model(seed=3).extend(ids)
    assert torch.equal(a, b)
    f32 = tiny_model(seed=3, dtype=torch.float32).extend(ids)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), a, atol=1e-3, rtol=1e-3)


def test_tiny_distributions_mix_confident_and_uncertain():
    probs = tiny_model(seed=0).extend(rand_ids(200, 259, seed=15)).softmax(-1)  # (200, V)
    top = probs.max(-1).values
    assert (top > 0.8).any() and (top < 0.3).any()


def test_perturbed_copy_agrees_sometimes_and_random_model_rarely():
    ids = rand_ids(200, 259, seed=16)
    base = tiny_model(seed=0)
    want = base.extend(ids).argmax(-1)
    agree = lambda m: (m.extend(ids).argmax(-1) == want).double().mean().item()  # noqa: E731
    assert agree(perturbed_copy(base, noise=0.0, seed=1)) == 1.0
    assert 0.3 < agree(perturbed_copy(base, noise=0.1, seed=1)) < 0.95
    assert agree(random_model(seed=0)) < 0.1
    assert base.length == 200  # copying does not touch the source's cache


# --- tokenizers --------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_chat():
    tok = ByteTokenizer()
    text = "héllo wörld, 日本語 🙂"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    assert tok.decode([256] + ids + [257, 258]) == text  # specials are skipped
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut multi-byte char is replaced, not raised
    chat = tok.chat_ids([{"role": "user", "content": "hi"}])
    assert chat[0] == 256 and tok.decode(chat) == "<|user|>\nhi\n<|assistant|>\n"
    assert tok.eos_token_ids == (257,)
    assert tok.same_vocab(ByteTokenizer()) and not tok.same_vocab(object())


def _train_tokenizer(texts: list[str], **kwargs):
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   **kwargs)


CORPUS = ["hello world, héllo wörld! the quick brown fox 日本語"] * 4
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def test_hf_tokenizer_encode_decode_chat_and_vocab():
    raw = _train_tokenizer(CORPUS)
    tok = HFTokenizer(raw, eos_token_ids=(5,))
    assert isinstance(tok, Tokenizer)
    assert tok.eos_token_ids == (5, 2)  # the model's ids first, then the tokenizer's own
    text = "héllo the wörld 日本語"
    ids = tok.encode(text)
    assert 1 not in ids and 2 not in ids  # no BOS / EOS added by default
    assert tok.decode(ids) == text
    assert tok.decode([1] + ids + [2]) == text  # specials skipped
    messages = [{"role": "user", "content": "hello"}]
    assert tok.chat_ids(messages) == tok.encode("hello\n")  # no template: plain contents
    raw.chat_template = TEMPLATE
    chat = tok.chat_ids(messages)
    assert chat == [1] + tok.encode("user: hello\nassistant:")
    assert tok.same_vocab(HFTokenizer(_train_tokenizer(CORPUS)))
    assert not tok.same_vocab(HFTokenizer(_train_tokenizer(["a different corpus entirely, zzz"] * 4)))
    assert not tok.same_vocab(ByteTokenizer())


def test_hf_tokenizer_prepends_bos_when_configured():
    tok = HFTokenizer(_train_tokenizer(CORPUS, add_bos_token=True))
    ids = tok.encode("hello")
    assert ids[0] == 1 and ids.count(1) == 1 and 2 not in ids


# --- load_hf -----------------------------------------------------------------------------------


def test_load_hf_from_local_folder(tmp_path):
    model = _hf_model("llama")
    model.save_pretrained(tmp_path)
    _train_tokenizer(CORPUS).save_pretrained(tmp_path)
    adapter, tok = load_hf(str(tmp_path), dtype=torch.float64)
    assert isinstance(tok, HFTokenizer) and not adapter.model.training
    ids = rand_ids(9, V_HF, seed=17)
    torch.testing.assert_close(adapter.extend(ids), fresh_logits("llama", ids), atol=ATOL, rtol=0)


def test_load_hf_errors(tmp_path, monkeypatch):
    with pytest.raises(AdaspecError, match="model folder not found"):
        load_hf(str(tmp_path / "missing"))
    with pytest.raises(AdaspecError, match="GGUF file not found"):
        load_hf(str(tmp_path / "missing.gguf"))
    with pytest.raises(AdaspecError, match="not found in"):
        load_hf(str(tmp_path), gguf_file="missing.gguf")

    (tmp_path / "m.gguf").write_bytes(b"")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(AdaspecError, match="pip install gguf accelerate"):
        load_hf(str(tmp_path / "m.gguf"))
    monkeypatch.undo()

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(AdaspecError, match=r"could not load org/model: .*a preset name \(`adaspec models list`\)"):
        load_hf("org/model")  # a hub id is no preset: the advice must not be `adaspec models pull org/model`
    with pytest.raises(AdaspecError, match=r"damaged or incomplete"):
        load_hf(str(tmp_path))  # a folder that exists but cannot be loaded


def test_absorb_fills_the_cache_like_extend_and_runs_the_head_once(kind):
    # a prefill wants no logits: absorb leaves the same cache as extend, with the head on one row at most
    adapter, ids = make_adapter(kind), rand_ids(20, vocab_of(kind), seed=11)
    want = fresh_logits(kind, ids)[-1]
    head = adapter.model.get_output_embeddings() if kind != "tiny" else None
    rows: list[int] = []
    hook = head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[-2])) if head is not None else None
    adapter.reset()
    absorb(adapter, ids[:-1])
    if hook is not None:
        hook.remove()
        assert rows == [1]  # the 19-token prefill ran the output head on its last position only
    assert adapter.length == 19
    torch.testing.assert_close(adapter.extend(ids[-1:])[-1], want, atol=ATOL, rtol=0)
