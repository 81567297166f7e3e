"""A packed q4k copy is read into plain torch modules (models/light.py), not a transformers model:
they compute transformers' bits, keep its state dict (so fingerprints and profiles hold), build the
transformers model around themselves when one is needed, and loading them never imports
transformers' model code."""

import subprocess
import sys

import pytest
import torch

from adaspec.models import light
from adaspec.models.registry import is_pulled

QWEN = "qwen2.5-coder-0.5b"
needs_qwen = pytest.mark.skipif(not is_pulled(QWEN), reason=f"{QWEN} is not pulled: run `adaspec models pull {QWEN}`")


def small_config(kind: str = "qwen2", **overrides):
    from transformers import AutoConfig

    fields = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=100, max_position_embeddings=256, rms_norm_eps=1e-6)
    return AutoConfig.for_model(kind, **{**fields, **overrides})


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_norm_and_rotary_compute_transformers_bits(kind):
    from transformers import AutoModelForCausalLM

    config = small_config(kind)
    reference = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, 64, generator=g) * 3
    norm = light.RMSNorm(64, config.rms_norm_eps)
    norm.weight.data = reference.model.norm.weight.data = torch.rand(64, generator=g) + 0.5
    assert torch.equal(norm(x), reference.model.norm(x))
    positions = torch.tensor([[0, 1, 2, 50, 51, 200, 255]])
    got, want = light.Rotary(config)(x, positions), reference.model.rotary_emb(x, positions)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(light.SiLU()(x), reference.model.layers[0].mlp.act_fn(x))


def test_only_what_the_runtime_supports_is_built_as_plain_modules():
    assert light.fits(small_config("qwen2")) and light.fits(small_config("llama"))
    assert not light.fits(small_config("llama", rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert not light.fits(small_config("llama", hidden_act="gelu"))
    assert not light.fits(small_config("gpt2"))


def test_the_skeleton_has_transformers_names_and_refuses_a_forward():
    from transformers import AutoModelForCausalLM

    config = small_config("qwen2")
    skeleton = light.CausalLM(config)
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    assert list(skeleton.state_dict()) == list(reference.state_dict())
    with pytest.raises(TypeError, match="adaspec's runtime"):
        skeleton(torch.tensor([[1, 2]]))


@needs_qwen
def test_a_packed_copy_runs_as_plain_modules_with_the_transformers_models_logits_and_fingerprint(monkeypatch):
    from adaspec.api import load_model
    from adaspec.calibration.identity import weights_fingerprint
    from adaspec.models.fast import FastDecoder
    from adaspec.models.hf import HFAdapter

    torch.set_num_threads(2)
    target, _ = load_model(QWEN, quant="q4k")  # builds the packed copy if this machine has none yet
    assert isinstance(target, FastDecoder) and isinstance(target.model, light.CausalLM)
    monkeypatch.setattr(light, "fits", lambda config: False)  # the same copy read as a transformers model
    before, _ = load_model(QWEN, quant="q4k")
    assert not isinstance(before.model, light.CausalLM)
    assert weights_fingerprint(target) == weights_fingerprint(before)
    ids = torch.randint(0, target.vocab_size, (44,), generator=torch.Generator().manual_seed(0))
    for adapter in (target, before):
        adapter.reset()
    assert torch.equal(target.extend(ids[:40]), before.extend(ids[:40]))
    assert torch.equal(target.extend(ids[40:]), before.extend(ids[40:]))
    # transformers' model around the same modules (the hf-* baselines, --target-runtime hf)
    hf = target.model.to_transformers()
    assert hf is target.model.to_transformers() and hf.model.layers[0].self_attn.q_proj is \
        target.model.model.layers[0].self_attn.q_proj
    assert weights_fingerprint(HFAdapter(hf, QWEN)) == weights_fingerprint(target)
    monkeypatch.undo()
    on_transformers, _ = load_model(QWEN, quant="q4k", target_runtime="hf")
    assert isinstance(on_transformers, HFAdapter) and callable(on_transformers.model.generate)


@needs_qwen
def test_loading_the_default_pair_never_imports_transformers_model_code():
    code = ("import sys; from adaspec.api import load_model; "
            f"load_model({QWEN!r}, quant='q4k'); load_model({QWEN!r}, quant='q4k', role='drafter'); "
            "print('transformers.modeling_utils' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"



@needs_qwen
def test_a_packed_copys_tokenizer_gives_the_model_tokenizers_ids_text_and_chat_prompts():
    """The packed copy reads its tokenizer.json as the generic fast tokenizer (no Python copy of the
    vocabulary beside the Rust one): the same as the model's own tokenizer class."""
    from transformers import AutoTokenizer

    from adaspec.api import load_model
    from adaspec.models.registry import path

    _, ours = load_model(QWEN, quant="q4k")
    folder = next(path(QWEN).parent.glob("run-q4k-*"))
    own = AutoTokenizer.from_pretrained(folder)
    assert type(own).__name__ == "Qwen2Tokenizer" and type(ours.tok) is not type(own)
    texts = ["def f(x):\n    return x  # ok", "Hello, 世界! 123 4567 ...\t\ttabs", "  leading\n\n\nblank",
             "<|im_start|>user\nhi<|im_end|>", "émoji 🤖 ąę", " ", "\u00a0\u2003x"]
    for text in texts:
        assert ours.tok.encode(text) == own.encode(text)
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        assert ours.tok.apply_chat_template(chat, add_generation_prompt=True) == \
            own.apply_chat_template(chat, add_generation_prompt=True)
    ids = torch.randint(0, len(own), (20, 40), generator=torch.Generator().manual_seed(0)).tolist()
    assert [ours.tok.decode(i) for i in ids] == [own.decode(i) for i in ids]
    assert ours.tok.get_vocab() == own.get_vocab() and ours.tok.all_special_ids == own.all_special_ids
