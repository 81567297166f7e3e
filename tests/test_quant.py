"""Int8 quantisation (models/quant.py) and the measured cost model (costmodel.py).

The claim that matters for speculative decoding: a quantised target scores a token the same way
whether it sees it alone or inside a k+1-token verification forward, so greedy speculative output
with quantised models equals greedy autoregressive output of the same quantised target.
"""

from __future__ import annotations

import json
import copy

import pytest
import torch
import torch.nn as nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from adaspec.api import make_config
from adaspec.config import AdaspecError
from adaspec.calibration.cost import CostModel, forward_cost, measure
from adaspec.decode import generate_ids
from adaspec.drafters.model import ModelDrafter
from adaspec.models.base import ModelAdapter
from adaspec.models.hf import HFAdapter
from adaspec.models import invariant
from adaspec.models.quant import Int8Linear, is_quantized, quantize_adapter
from adaspec.models.tiny import perturbed_copy, random_model, tiny_model

V_HF = 101
PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 40, 41], [256, 100, 101, 102, 32, 102, 40, 120, 41, 58]]


def _qwen(seed: int) -> HFAdapter:
    # Qwen2: biases on q/k/v and a head tied to the input embedding, as in the real presets
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=V_HF, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return HFAdapter(Qwen2ForCausalLM(config).eval(), name=f"qwen-rand-{seed}")


@pytest.fixture(scope="module")
def floats():
    return {"tiny": tiny_model(seed=0, dtype=torch.float32, max_len=128), "hf": _qwen(0)}


@pytest.fixture(scope="module")
def quants(floats):
    return {kind: quantize_adapter(a, "int8", copy=True) for kind, a in floats.items()}


@pytest.fixture(params=["tiny", "hf"])
def kind(request):
    return request.param


def ids_for(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    vocab = 256 if kind == "tiny" else V_HF
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# --- the adapter protocol still holds ------------------------------------------------------------


def test_quantised_adapter_keeps_the_protocol(quants, floats, kind):
    q, f = quants[kind], floats[kind]
    assert isinstance(q, ModelAdapter) and is_quantized(q)
    assert not any(type(m) is nn.Linear for m in q.model.modules())
    assert (q.vocab_size, q.eos_token_ids, q.max_length, q.length) == (f.vocab_size, f.eos_token_ids, f.max_length, 0)
    assert not is_quantized(f)  # copy=True left the float model alone
    assert any(type(m) is nn.Linear for m in f.model.modules())


def test_extend_in_pieces_equals_one_forward(quants, kind):
    q, ids = quants[kind], ids_for(kind, 40)
    q.reset()
    full = q.extend(ids).clone()  # (40, V)
    q.reset()
    pieces = torch.cat([q.extend(ids[a:b]).clone() for a, b in ((0, 7), (7, 8), (8, 13), (13, 40))])
    q.reset()
    # per-row activation ranges: only float32 attention rounding separates the two
    torch.testing.assert_close(pieces, full, atol=1e-4, rtol=1e-4)
    assert torch.equal(pieces.argmax(-1), full.argmax(-1))


def test_transformers_model_is_bit_exact_however_tokens_are_split(quants, floats, monkeypatch):
    q, ids = quants["hf"], ids_for("hf", 40, seed=4)
    assert q.model.config._attn_implementation == invariant.NAME
    assert floats["hf"].model.config._attn_implementation == "sdpa"  # copy=True: the original keeps its own
    q.reset()
    q.extend(ids[:10])
    chunked = torch.cat([q.extend(ids[a:b]).clone() for a, b in ((10, 15), (15, 16), (16, 40))])
    q.rollback(10)
    one_by_one = torch.cat([q.extend(ids[i:i + 1]).clone() for i in range(10, 40)])
    q.reset()
    assert torch.equal(chunked, one_by_one)
    # past MAX_ROWWISE new tokens (prefills) the fused kernel runs: same values up to rounding
    monkeypatch.setattr(invariant, "MAX_ROWWISE", 4)
    q.extend(ids[:10])
    fused = q.extend(ids[10:40]).clone()
    q.reset()
    torch.testing.assert_close(fused, one_by_one, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("back_to", [0, 1, 17, 29])
def test_rollback_then_reextend_equals_fresh(quants, kind, back_to):
    q, ids = quants[kind], ids_for(kind, 30, seed=1)
    q.reset()
    fresh = q.extend(ids).clone()
    q.reset()
    q.extend(ids[:20])
    q.extend(ids_for(kind, 10, seed=2))  # a rejected continuation
    q.rollback(min(back_to, 20))
    again = q.extend(ids[min(back_to, 20):]).clone()
    q.reset()
    torch.testing.assert_close(again, fresh[min(back_to, 20):], atol=1e-4, rtol=1e-4)


def test_int8_linear_rows_do_not_depend_on_their_batch():
    torch.manual_seed(0)
    lin = Int8Linear.from_float(nn.Linear(48, 80))
    x = torch.randn(9, 48) * torch.logspace(-2, 2, 9)[:, None]  # rows of very different ranges
    with torch.inference_mode():
        together = lin(x)
        alone = torch.cat([lin(x[i:i + 1]) for i in range(9)])
        batched = lin(x.view(3, 3, 48)).view(9, 80)  # (B, T, C) as transformers calls it
    assert torch.equal(together, alone) and torch.equal(together, batched)


def test_row_sums_taken_in_slices_of_rows_are_those_of_the_whole_matrix():
    """_rowsum sums 4096 rows at a time (the int32 sum would widen the whole matrix): the same exact sums."""
    from adaspec.models.quant import _rowsum

    torch.manual_seed(0)
    weight = torch.randn(4096 + 905, 24)
    qweight = torch.quantize_per_channel(weight, weight.abs().amax(1) / 127, torch.zeros(weight.shape[0], dtype=torch.long),
                                         0, torch.qint8)
    whole = qweight.int_repr().to(torch.int64).sum(1).double() * qweight.q_per_channel_scales().double()
    assert torch.equal(_rowsum(qweight), whole.float())


def test_int8_linear_is_close_to_float():
    torch.manual_seed(0)
    float_lin = nn.Linear(64, 96)
    lin = Int8Linear.from_float(float_lin)
    x = torch.randn(16, 64)
    with torch.inference_mode():
        ref, out = float_lin(x), lin(x)
    assert ((out - ref).norm() / ref.norm()).item() < 0.02
    assert copy.deepcopy(lin)(x).equal(out)


def test_outputs_stay_close_to_float32(quants, floats, kind):
    q, f, ids = quants[kind], floats[kind], ids_for(kind, 40, seed=3)
    q.reset(), f.reset()
    ref, out = f.extend(ids).clone(), q.extend(ids).clone()
    q.reset(), f.reset()
    assert ((out - ref).norm() / ref.norm()).item() < 0.1
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.8


# --- losslessness of speculation with quantised models -------------------------------------------


@pytest.fixture(scope="module")
def tiny_drafters(floats):
    target = floats["tiny"]
    return {
        "perturbed": quantize_adapter(perturbed_copy(target, noise=0.5, seed=3), "int8"),
        "random": quantize_adapter(random_model(seed=7, dtype=torch.float32, max_len=128), "int8"),
    }


def _greedy(target, drafter, prompt, method="ar", **opts):
    cfg = make_config(method, max_new_tokens=30, ignore_eos=True, **opts)
    return generate_ids(target, ModelDrafter(drafter) if drafter is not None else None, prompt, cfg).token_ids


@pytest.mark.parametrize("which", ["perturbed", "random"])
def test_speculative_greedy_equals_autoregressive_tiny(quants, tiny_drafters, which):
    target = quants["tiny"]
    for prompt in PROMPTS:
        ar = _greedy(target, None, prompt)
        for k in (1, 3, 6):
            assert _greedy(target, tiny_drafters[which], prompt, "fixed", k=k) == ar, (which, prompt, k)


def test_speculative_greedy_equals_autoregressive_hf(quants):
    target, drafter = quants["hf"], quantize_adapter(_qwen(1), "int8")
    twin = copy.deepcopy(target)  # a drafter that agrees everywhere (it needs its own cache)
    for prompt in ([1, 5, 9, 33], [1, 70, 3, 3, 3, 12, 40]):
        ar = _greedy(target, None, prompt)
        for k in (2, 5):
            assert _greedy(target, drafter, prompt, "fixed", k=k) == ar, (prompt, k)
        assert _greedy(target, twin, prompt, "fixed", k=4) == ar  # every draft accepted


# --- options and errors --------------------------------------------------------------------------


def test_lm_head_can_stay_float(floats, kind):
    q = quantize_adapter(floats[kind], "int8", lm_head=False, copy=True)
    head = q.model.get_output_embeddings() if kind == "hf" else q.model.head
    assert type(head) is nn.Linear and is_quantized(q)
    assert sum(type(m) is nn.Linear for m in q.model.modules()) == 1
    quantize_adapter(q, "int8")  # a second pass converts what is left: the head
    assert not any(type(m) is nn.Linear for m in q.model.modules())


def test_quantised_adapter_deep_copies(quants):
    q, ids = quants["tiny"], ids_for("tiny", 12)
    twin = copy.deepcopy(q)
    q.reset(), twin.reset()
    assert torch.equal(q.extend(ids), twin.extend(ids))
    q.reset(), twin.reset()


def test_errors(floats):
    with pytest.raises(AdaspecError, match="unknown quantisation mode 'int4'"):
        quantize_adapter(floats["tiny"], "int4")
    with pytest.raises(AdaspecError, match="needs a float32 model.*float64"):
        quantize_adapter(tiny_model(seed=0, dtype=torch.float64, max_len=32), "int8")
    bf16 = HFAdapter(copy.deepcopy(floats["hf"].model).to(torch.bfloat16), name="bf16")
    with pytest.raises(AdaspecError, match="needs a float32 model.*bfloat16"):
        quantize_adapter(bf16, "int8")
    on_gpu = copy.copy(floats["tiny"])
    on_gpu.device = torch.device("cuda", 0)  # only the attribute: no GPU needed to test the refusal
    with pytest.raises(AdaspecError, match="int8 is a CPU path; on GPU use --dtype bfloat16"):
        quantize_adapter(on_gpu, "int8")

    class NoModel:
        name, device = "ngram", torch.device("cpu")

    with pytest.raises(AdaspecError, match="no torch `.model`"):
        quantize_adapter(NoModel(), "int8")


# --- cost model ----------------------------------------------------------------------------------


def test_cost_model_json_round_trip():
    cm = CostModel({1: 83.5, 2: 87.0, 4: 86.0, 8: 116.0}, drafter_ms_per_token=30.5, machine="cpu x", threads=2)
    back = CostModel.from_dict(json.loads(json.dumps(cm.to_dict())))
    assert back == cm and all(isinstance(n, int) for n in back.target_ms)
    with pytest.raises(KeyError):
        CostModel.from_dict({})  # a profile turns this into a clear error (test_calibrate)


def test_target_cost_interpolates_between_measured_points():
    cm = CostModel({4: 170.0, 1: 100.0, 2: 150.0, 8: 250.0}, None, "cpu", 2)
    assert cm.target_cost(1) == 100.0
    assert cm.target_cost(2) == pytest.approx(150.0)
    assert cm.target_cost(3) == pytest.approx(160.0)  # halfway between 150 and 170
    assert cm.target_cost(6) == pytest.approx(210.0)
    assert cm.target_cost(16) == pytest.approx(410.0)  # past the last point: along the 4 -> 8 line
    assert CostModel({1: 10.0, 2: 30.0, 4: 20.0}, None, "cpu", 1).target_cost(8) == pytest.approx(20.0)  # not below last
    with pytest.raises(AdaspecError):
        cm.target_cost(0.5)
    with pytest.raises(AdaspecError, match="target_ms\\[1\\]"):
        CostModel({2: 10.0}, None, "cpu", 1)


def test_forward_cost_measures_and_leaves_the_cache_empty(quants, floats):
    q = quants["tiny"]
    q.extend(ids_for("tiny", 5))
    ms = forward_cost(q, prompt_len=20, new_tokens=(1, 2, 4), repeats=2)
    assert sorted(ms) == [1, 2, 4] and all(t > 0 for t in ms.values())
    assert q.length == 0
    cm = measure(q, floats["tiny"], prompt_len=10, new_tokens=(1, 3), repeats=1)
    assert cm.drafter_ms_per_token > 0 and cm.threads == torch.get_num_threads() and cm.machine
    assert cm.target_cost(2) > 0
    with pytest.raises(AdaspecError, match="exceeds its context"):
        forward_cost(q, prompt_len=120, new_tokens=(16,))
