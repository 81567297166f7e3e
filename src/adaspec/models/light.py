"""A Llama-family decoder as plain torch modules: what a packed q4k copy (models/packed.py) is read
into, so that loading it never imports transformers' model code.

Why: adaspec's runtime (models/fast.py) only reads a model's modules (embedding, norms, rotary
frequencies, linear layers, the MLP's activation); it never calls transformers' forward. But
building a transformers model, even on the meta device, imports `transformers.modeling_utils`, and
with it torch._dynamo, sympy, torch.distributed and accelerate: 0.11 GB resident when imported alone
after torch, 0.02 GB less after loading the default target here (the Intel Xeon of session 13;
docs/runtime.md, where the tokenizer was the larger part of what went over the memory goal).

The modules carry transformers' names, parameters, buffers and registration order (model.embed_tokens,
model.layers.N.self_attn.q_proj, ..., model.norm, model.rotary_emb, lm_head), so state dicts, weight
fingerprints and calibration profiles are those of the transformers model, and they compute the
same bits: `RMSNorm` and `Rotary` run transformers' operations in transformers' order (tested
against transformers' own modules). `to_transformers` builds the transformers model around the very
same modules (no copy) for whatever needs transformers' forward or `generate` (the `hf-*` benchmark
baselines, `--target-runtime hf`, `--drafter-runtime hf`).

Only what adaspec's runtime supports is built this way (`fits`: Llama, Qwen2 or Mistral, default
rotary frequencies, SiLU); any other model is read into its transformers class as before.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("llama", "qwen2", "mistral")


def fits(config) -> bool:
    """Whether a model of this (transformers) config can be built here instead of in transformers."""
    rope = rope_parameters(config)
    return (getattr(config, "model_type", None) in KINDS and getattr(config, "hidden_act", None) == "silu"
            and rope["rope_type"] == "default" and rope["rope_theta"] is not None
            and not (config.model_type == "mistral" and getattr(config, "sliding_window", None))
            and set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"})


def rope_parameters(config) -> dict:
    """{"rope_type", "rope_theta"} of a config (transformers 5's rope_parameters, or 4.x's fields)."""
    rope = getattr(config, "rope_parameters", None)
    if rope is None:
        scaling = getattr(config, "rope_scaling", None) or {}
        rope = {"rope_type": scaling.get("rope_type", scaling.get("type", "default")),
                "rope_theta": getattr(config, "rope_theta", None)}
    return {"rope_type": rope.get("rope_type", "default"), "rope_theta": rope.get("rope_theta")}


class RMSNorm(nn.Module):
    """transformers' Llama/Qwen2 RMSNorm, operation for operation."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """transformers' default rotary embedding: (x, positions (B, T)) -> cos, sin (B, T, head_dim)."""

    def __init__(self, config):
        super().__init__()
        dim = _head_dim(config)
        base = rope_parameters(config)["rope_theta"]
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)),
                             persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class SiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rebuild_rotary(model: nn.Module) -> None:
    """Give a transformers model built on the meta device its own rotary modules, made from its config
    (their buffers are derived, and not all of them are saved)."""
    for name in [n for n, _ in model.named_modules() if n.endswith("rotary_emb")]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, type(model.get_submodule(name))(config=model.config))


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Module:
    return nn.Linear(n_in, n_out, bias=bias, device="meta")  # a place holder: the packed copy fills it


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = _head_dim(config)
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        bias = getattr(config, "attention_bias", config.model_type == "qwen2")
        self.q_proj = _linear(config.hidden_size, config.num_attention_heads * d, bias)
        self.k_proj = _linear(config.hidden_size, kv * d, bias)
        self.v_proj = _linear(config.hidden_size, kv * d, bias)
        self.o_proj = _linear(config.num_attention_heads * d, config.hidden_size, False)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, False)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, False)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, False)
        self.act_fn = SiLU()


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        with torch.device("meta"):
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device="meta")
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        with torch.device("meta"):
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config)


class CausalLM(nn.Module):
    """The skeleton of a Llama-family causal LM of `config`, every weight a meta place holder until
    the packed copy sets its modules and parameters (models/packed.py checks that none is left)."""

    def __init__(self, config, generation_config=None):
        super().__init__()
        self.config, self.generation_config = config, generation_config
        self.model = Decoder(config)
        self.lm_head = _linear(config.hidden_size, config.vocab_size, False)
        self._transformers: list[nn.Module] = []  # a list: not a submodule (state dict, fingerprint)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.model.embed_tokens = module

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, *args, **kwargs):
        raise TypeError("a packed q4k model runs on adaspec's runtime (models/fast.py); for transformers' forward "
                        "use to_transformers()")

    def to_transformers(self) -> nn.Module:
        """The transformers model of this config holding these very modules (built once, then kept)."""
        if not self._transformers:
            from transformers import AutoModelForCausalLM

            from adaspec.models.quant import _use_row_attention

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
            for name, module in self.named_modules():
                if name and not name.endswith("rotary_emb") and not list(module.children()):
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, module)
            rebuild_rotary(model)  # transformers' own
            if self.generation_config is not None:
                model.generation_config = self.generation_config
            model.eval()
            _use_row_attention(model)
            self._transformers.append(model)
        return self._transformers[0]


def transformers_model(model: nn.Module) -> nn.Module:
    """`model` as a transformers model: itself, or the one built around a light model's modules."""
    return model.to_transformers() if isinstance(model, CausalLM) else model
