"""adaspec's own decoder runtime for Llama-family transformers models (Llama, Qwen2, Mistral without
sliding windows, SmolLM2), used for drafters.

It runs the transformers model's own modules (embedding, norms, MLP activation, rotary, linear
layers, float or `Int8Linear`) through a short loop with a preallocated key/value cache (one tensor
per layer, grown by doubling; `rollback` only moves the length), and computes attention itself: a
short forward (<= ``MAX_ROWWISE`` new tokens) one query row at a time over the prefix the row may
see, exactly the call a one-token step makes, so each row's logits are bit-identical however tokens
are split into forwards (what models/invariant.py gives transformers); a long forward (prefill) in
one causal SDPA call.

Why a drafter runs on it: much of a one-token int8 forward of a small model is spent outside the
matrix kernels, in the per-call work of `Int8Linear` (the input's range, its quantisation, the
rescale). Here the int8 projections that read the same input are fused into one call (q, k, v;
gate, up: bit-identical, `fuse_int8`), and with ``exact_rows=False`` every int8 layer becomes one
fbgemm dynamic-quantisation call (`DynamicInt8Linear`). A drafter's numbers only steer proposals,
never what is committed, so this is free of any quality cost. The target stays on transformers: at
full depth with exact rows this runtime was not faster. The measurements behind both choices are
in docs/method.md ("Drafter runtime").

``n_layers=n`` gives a drafter that runs only the first n layers, then the final norm and the LM
head, sharing every weight with the full model (its own cache; no extra weight memory).

The transformers model stays intact (the `hf-*` benchmark baselines use it) and is reachable as
`.model`, so quantisation, fingerprints and profiles see the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaspec.config import AdaspecError
from adaspec.models.base import check_extend, check_rollback
from adaspec.models.hf import _as_ids
from adaspec.models.invariant import MAX_ROWWISE  # forwards with more new tokens than this are prefills
SUPPORTED = ("llama", "qwen2", "mistral")


def supports(model) -> str | None:
    """None when `model` can run on FastDecoder, else the reason it cannot."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} is not one of {', '.join(SUPPORTED)}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and kind == "mistral":
        return "sliding-window attention is not supported"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"layer types {sorted(layer_types)} are not all full attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "the model has no .model.layers / .model.rotary_emb"
    attn = inner.layers[0].self_attn
    if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
        return "per-head query/key norms are not supported"
    return None


class FastDecoder:
    """`ModelAdapter` over a Llama-family transformers model, without transformers' forward.

    n_layers: run only the first n decoder layers (an early-exit model); None runs them all.
    exact_rows: keep every row's logits independent of the other rows of its forward (needed by a
    target under lossless speculation); False lets int8 layers quantise a forward's input with one
    range, one kernel call per layer -- faster, and right for a drafter.
    """

    def __init__(self, model, name: str, *, n_layers: int | None = None, exact_rows: bool = True):
        why = supports(model)
        if why is not None:
            raise AdaspecError(f"{name}: the fast runtime cannot run this model ({why}); "
                               "use its transformers adapter (drafter_runtime='hf')")
        self.model = model.eval()
        self.name = name
        self.exact_rows = exact_rows
        config = model.config
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        total = config.num_hidden_layers
        self.n_layers = total if n_layers is None else n_layers
        if not 1 <= self.n_layers <= total:
            raise AdaspecError(f"{name} has {total} layers; an early exit needs 1..{total}, got {n_layers}")
        head = model.get_output_embeddings()
        self.vocab_size = int(getattr(head, "out_features", None) or head.weight.shape[0])
        gen = getattr(model, "generation_config", None)
        self.eos_token_ids = _as_ids(getattr(gen, "eos_token_id", None)) or _as_ids(config.eos_token_id)
        self.max_length = getattr(config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.reset()

    # ---- cache ---------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        """Empty the cache; re-read the model's modules if quantisation has replaced them."""
        self._bind()
        self._length = 0
        self._k: list[torch.Tensor] = []  # per layer (n_kv, capacity, head_dim)
        self._v: list[torch.Tensor] = []

    def _bind(self) -> None:
        inner = self.model.model
        layers = list(inner.layers)[: self.n_layers]
        if getattr(self, "_bound_to", None) is layers[0].self_attn.q_proj:
            return
        self._embed, self._norm, self._rope = inner.embed_tokens, inner.norm, inner.rotary_emb
        self._head = self.model.get_output_embeddings()
        self._layers = [_Layer(layer, self.exact_rows) for layer in layers]
        if not self.exact_rows:
            self._head = _one_call(self._head)
        self._bound_to = layers[0].self_attn.q_proj

    def rollback(self, length: int) -> None:
        check_rollback(self, length)
        self._length = length  # entries past it are overwritten by the next extend

    def _reserve(self, needed: int, like: torch.Tensor) -> None:
        capacity = self._k[0].shape[1] if self._k else 0
        if needed <= capacity:
            return
        new = max(needed, 2 * capacity, 256)
        if self.max_length is not None:
            new = max(needed, min(new, self.max_length))
        shape = (self.n_kv, new, self.head_dim)
        for store in (self._k, self._v):
            grown = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in self._layers]
            for old, g in zip(store, grown):
                g[:, : self._length] = old[:, : self._length]
            store[:] = grown

    # ---- forward -------------------------------------------------------------------------------

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        return self._forward(ids, head=True)

    def absorb(self, ids: torch.Tensor) -> None:
        """extend without logits (a prefill): the final norm and the head are skipped."""
        self._forward(ids, head=False)

    def _forward(self, ids: torch.Tensor, head: bool) -> torch.Tensor | None:
        n, start = check_extend(self, ids), self._length
        with torch.inference_mode():
            x = self._embed(ids.to(self.device, torch.long)[None])  # (1, n, hidden)
            positions = torch.arange(start, start + n, device=self.device)[None]
            cos, sin = self._rope(x, positions)  # (1, n, head_dim) each
            self._reserve(start + n, x)
            for i, layer in enumerate(self._layers):
                x = x + self._attention(i, layer, layer.norm1(x), cos, sin, start)
                x = x + layer.mlp(layer.norm2(x))
            logits = self._head(self._norm(x))[0] if head else None  # (n, V)
        self._length = start + n
        return logits

    def _attention(self, i: int, layer: "_Layer", h: torch.Tensor, cos, sin, start: int) -> torch.Tensor:
        n, d = h.shape[1], self.head_dim
        q, k, v = layer.qkv(h)
        q = q.view(n, self.n_heads, d).transpose(0, 1)  # (H, n, d)
        k = k.view(n, self.n_kv, d).transpose(0, 1)  # (H_kv, n, d)
        v = v.view(n, self.n_kv, d).transpose(0, 1)
        q, k = _rotate(q, cos[0], sin[0]), _rotate(k, cos[0], sin[0])
        end = start + n
        self._k[i][:, start:end] = k
        self._v[i][:, start:end] = v
        keys, values = self._k[i], self._v[i]
        gqa = self.n_kv != self.n_heads
        if n > MAX_ROWWISE:  # prefill: one causal call; a mask when earlier tokens are cached
            mask = None
            if start:
                mask = torch.ones(n, end, dtype=torch.bool, device=h.device).tril(start)
            out = F.scaled_dot_product_attention(q, keys[:, :end], values[:, :end], attn_mask=mask,
                                                 is_causal=mask is None, enable_gqa=gqa)
        else:  # each row exactly as a one-token step computes it
            out = torch.cat([
                F.scaled_dot_product_attention(q[:, r : r + 1], keys[:, : start + r + 1], values[:, : start + r + 1],
                                               enable_gqa=gqa)
                for r in range(n)], dim=1)  # (H, n, d)
        return layer.o_proj(out.transpose(0, 1).reshape(1, n, self.n_heads * d))


class _Layer:
    """One decoder layer's modules, int8 projections that share an input fused into one call."""

    def __init__(self, layer, exact_rows: bool):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = _fused([attn.q_proj, attn.k_proj, attn.v_proj], exact_rows)
        self.o_proj = attn.o_proj if exact_rows else _one_call(attn.o_proj)
        self._gate_up = _fused([mlp.gate_proj, mlp.up_proj], exact_rows)
        self._down = mlp.down_proj if exact_rows else _one_call(mlp.down_proj)
        self._act = mlp.act_fn

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self._gate_up(h)
        return self._down(self._act(gate) * up)


def _fused(linears: list, exact_rows: bool):
    """h -> the outputs of `linears` (a tuple), with one kernel call when they are all int8. Float
    layers stay separate: fusing them would copy their weights (the transformers model keeps its own)."""
    from adaspec.models.quant import Int8Linear, fuse_int8

    if not all(isinstance(m, Int8Linear) for m in linears):
        return lambda h: tuple(m(h) for m in linears)
    fused = fuse_int8(linears)
    if not exact_rows:
        fused = _one_call(fused)
    sizes = [m.out_features for m in linears]
    return lambda h: fused(h).split(sizes, dim=-1)


def _one_call(linear):
    """An int8 layer as a single dynamic-quantisation call (drafters only); other layers unchanged."""
    from adaspec.models.quant import DynamicInt8Linear, Int8Linear

    return DynamicInt8Linear(linear) if isinstance(linear, Int8Linear) else linear


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (the rotate-half convention of Llama-family checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
