"""adaspec's own runtime for Llama-family models (models/fast.py) and the int8 pieces it relies on.

What must hold: in float32 it computes what transformers computes; with exact rows a k-token
forward scores each row bit-identically to one-token steps (lossless speculation needs that on a
target); a drafter on it, fused or dynamically quantised or cut short (early exit), never changes
greedy output.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from adaspec.api import Engine, early_exit_drafter, make_config
from adaspec.config import AdaspecError
from adaspec.decode import generate_ids
from adaspec.drafters.model import ModelDrafter
from adaspec.models.fast import MAX_ROWWISE, FastDecoder, supports
from adaspec.models.hf import HFAdapter
from adaspec.models.quant import DynamicInt8Linear, Int8Linear, fuse_int8, quantize_adapter

V = 211


def _model(kind: str, seed: int, layers: int = 3):
    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=V, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2)
    torch.manual_seed(seed)
    if kind == "qwen2":  # biases on q/k/v, tied head, as in the real presets
        return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_float32_matches_transformers_through_prefill_steps_and_rollback(kind):
    model = _model(kind, 0)
    ref, fast = HFAdapter(model, "ref"), FastDecoder(model, "fast")
    ids = _ids(MAX_ROWWISE + 30)
    for a, b in [(0, MAX_ROWWISE + 10), (MAX_ROWWISE + 10, MAX_ROWWISE + 11), (MAX_ROWWISE + 11, MAX_ROWWISE + 16)]:
        torch.testing.assert_close(fast.extend(ids[a:b]), ref.extend(ids[a:b]), rtol=1e-4, atol=1e-4)
    for a in (ref, fast):
        a.rollback(MAX_ROWWISE + 12)
    torch.testing.assert_close(fast.extend(ids[-6:]), ref.extend(ids[-6:]), rtol=1e-4, atol=1e-4)
    assert fast.length == ref.length == MAX_ROWWISE + 18
    # a long forward on top of a cache goes through the masked prefill path
    torch.testing.assert_close(fast.extend(ids[:MAX_ROWWISE + 5]), ref.extend(ids[:MAX_ROWWISE + 5]),
                               rtol=1e-4, atol=1e-4)


def test_absorb_skips_the_head_and_leaves_the_cache_extend_would():
    model = _model("qwen2", 6)
    ref, fast = HFAdapter(model, "ref"), FastDecoder(model, "fast")
    ids = _ids(30, seed=4)
    calls: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(1))
    fast.absorb(ids[:-1])
    hook.remove()
    assert calls == [] and fast.length == 29
    torch.testing.assert_close(fast.extend(ids[-1:]), ref.extend(ids)[-1:], rtol=1e-4, atol=1e-4)


def test_cache_grows_past_its_first_allocation():
    model = _model("llama", 1)
    ref, fast = HFAdapter(model, "ref"), FastDecoder(model, "fast")
    ids = _ids(300, seed=3)
    outs = [(fast.extend(ids[a:a + 50]), ref.extend(ids[a:a + 50])) for a in range(0, 300, 50)]
    for got, want in outs:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert fast.length == 300


@pytest.mark.parametrize("n", [2, 5, 9])
def test_int8_exact_rows_are_bit_identical_to_one_token_steps(n):
    adapter = quantize_adapter(HFAdapter(_model("qwen2", 2), "q"), "int8")
    fast = FastDecoder(adapter.model, "fast")
    ids = _ids(40, seed=n)
    fast.extend(ids[: 40 - n])
    batched = fast.extend(ids[40 - n:]).clone()
    fast.rollback(40 - n)
    single = torch.cat([fast.extend(ids[i:i + 1]).clone() for i in range(40 - n, 40)])
    assert torch.equal(batched, single)


def test_fused_int8_layers_equal_separate_calls_bit_for_bit():
    torch.manual_seed(0)
    linears = [torch.nn.Linear(48, out, bias=bias) for out, bias in ((32, True), (16, False), (16, True))]
    q = [Int8Linear.from_float(m) for m in linears]
    x = torch.randn(5, 48)
    separate = torch.cat([m(x) for m in q], dim=-1)
    fused = fuse_int8(q)
    assert torch.equal(fused(x), separate)
    assert all(m._held is None for m in q)  # the layers gave their copies up: fusing costs no memory
    assert fuse_int8(q) is fused  # a second runtime over the same layers shares the fused one
    assert torch.equal(torch.cat([m(x) for m in q], dim=-1), separate)  # rebuilt from the fused rows
    assert torch.equal(q[1].weight_int8().int_repr(), Int8Linear.from_float(linears[1]).weight_int8().int_repr())
    with pytest.raises(ValueError, match="input width"):
        fuse_int8([q[0], Int8Linear.from_float(torch.nn.Linear(8, 4))])


def test_dynamic_int8_is_close_to_per_row_int8_on_one_row():
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 64)
    exact = Int8Linear.from_float(lin)
    dynamic = DynamicInt8Linear(exact)
    x = torch.randn(1, 96)
    want = lin(x)
    err_exact = (exact(x) - want).abs().max()
    err_dyn = (dynamic(x) - want).abs().max()
    # one row: the dynamic range covers the row's own range (plus zero), so errors are of one size
    assert err_dyn < 4 * err_exact + 1e-3
    assert err_dyn < 0.05 * want.abs().max()


@pytest.mark.parametrize("drafter_kind", ["fast-dynamic", "early-exit"])
def test_greedy_output_with_fast_drafters_equals_autoregressive(drafter_kind):
    target = quantize_adapter(HFAdapter(_model("qwen2", 3), "target"), "int8")
    if drafter_kind == "fast-dynamic":  # the same weights: long drafts, many fully accepted steps
        twin = quantize_adapter(HFAdapter(_model("qwen2", 3), "twin"), "int8")
        drafter = ModelDrafter(FastDecoder(twin.model, "twin", exact_rows=False))
    else:
        drafter, share = early_exit_drafter(target, 2)
        assert 0 < share < 1
    for seed in range(3):
        prompt = _ids(12, seed=seed).tolist()
        ar = generate_ids(target, None, prompt, make_config("ar", max_new_tokens=40, ignore_eos=True))
        for k in (2, 6):
            spec = generate_ids(target, drafter, prompt, make_config("fixed", k=k, max_new_tokens=40, ignore_eos=True))
            assert spec.token_ids == ar.token_ids
            assert spec.stats.drafted > 0


def test_early_exit_drafter_joins_the_pool_and_output_stays_exact():
    target = quantize_adapter(HFAdapter(_model("llama", 4), "target"), "int8")
    engine = Engine(target, None)
    engine.extra_drafters.append(early_exit_drafter(target, 2))
    prompt = _ids(10, seed=7).tolist()
    ar = engine.generate(prompt, method="ar", max_new_tokens=32, ignore_eos=True)
    pool = engine.generate(prompt, method="multi-draft", max_new_tokens=32, ignore_eos=True)
    assert pool.token_ids == ar.token_ids


def test_unsupported_models_and_depths_are_refused_clearly():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    assert "gpt2" in supports(gpt2)
    with pytest.raises(AdaspecError, match="fast runtime cannot run"):
        FastDecoder(gpt2, "gpt2")
    with pytest.raises(AdaspecError, match="Llama-family"):
        early_exit_drafter(HFAdapter(gpt2, "gpt2"), 1)
    with pytest.raises(AdaspecError, match="early exit needs 1..3"):
        FastDecoder(_model("llama", 5), "m", n_layers=4)
