"""adaspec's own decoder runtime for Llama-family transformers models (Llama, Qwen2, Mistral without
sliding windows, SmolLM2), used for drafters, q4k targets and batched serving.

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
never what is committed, so this is free of any quality cost. A q4k target runs here with exact
rows, its Q4_K projections fused on the same weights (`q4k.fuse_blocks`); an int8 target stays on
transformers' forward by default (chosen while fusing int8 projections copied their weights; since
session 10 the separate layers give their copies up, `quant.fuse_int8`). The
measurements behind these choices are in docs/method.md ("Drafter runtime") and docs/runtime.md.

``n_layers=n`` gives a drafter that runs only the first n layers, then the final norm and the LM
head, sharing every weight with the full model (its own cache; no extra weight memory).

The transformers model stays intact (the `hf-*` benchmark baselines use it) and is reachable as
`.model`, so quantisation, fingerprints and profiles see the same weights.
"""

from __future__ import annotations

import itertools

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
        return self._slot.length

    def reset(self) -> None:
        """Empty the cache; re-read the model's modules if quantisation has replaced them."""
        self._bind()
        self._slot = self.new_slot()

    def new_slot(self) -> "Slot":
        """An empty cache for one more sequence (batched decoding: `extend_batch`, `SlotView`)."""
        return Slot(self)

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
        self._slot.length = length  # entries past it are overwritten by the next extend

    # ---- forward -------------------------------------------------------------------------------

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        check_extend(self, ids)
        return self.extend_batch([self._slot], [ids])[0]

    def absorb(self, ids: torch.Tensor) -> None:
        """extend without logits (a prefill): the final norm and the head are skipped."""
        check_extend(self, ids)
        self.extend_batch([self._slot], [ids], logits=[False])

    def extend_batch(self, slots: list["Slot"], ids: list[torch.Tensor],
                     logits: list[bool] | None = None) -> list[torch.Tensor | None]:
        """One forward over several sequences, each appending ids[i] (n_i,) to slots[i]: the rows of
        all of them are stacked for the embedding, norms, linear layers and head, and each row
        attends to its own sequence's cache. With exact rows a row's result does not depend on the
        other rows (int8 rows are quantised one by one and summed exactly; attention is per row), so
        a sequence decodes identically alone or among others. logits[i] False: none for sequence i.
        Returns the logits (n_i, V) of each sequence (None where not wanted)."""
        if len(slots) != len(ids) or len({id(s) for s in slots}) != len(slots):
            raise ValueError("extend_batch takes one id tensor per slot, each slot once")
        logits = [True] * len(slots) if logits is None else logits
        sizes = [int(t.shape[0]) for t in ids]
        for slot, n in zip(slots, sizes):
            if n == 0:
                raise ValueError("extend_batch takes at least one token id per sequence")
            if self.max_length is not None and slot.length + n > self.max_length:
                raise AdaspecError(f"{self.name}: prompt + new tokens exceed the context of {self.max_length} tokens")
        with torch.inference_mode():
            x = self._embed(torch.cat(ids).to(self.device, torch.long)[None])  # (1, R, hidden), R = sum n_i
            positions = torch.cat([torch.arange(s.length, s.length + n) for s, n in zip(slots, sizes)])
            cos, sin = self._rope(x, positions.to(self.device)[None])  # (1, R, head_dim) each
            for slot, n in zip(slots, sizes):
                slot.reserve(slot.length + n, x)
            for i, layer in enumerate(self._layers):
                x = x + self._attention(i, layer, layer.norm1(x), cos, sin, slots, sizes)
                x = x + layer.mlp(layer.norm2(x))
            x = self._norm(x)  # every row, logits or not: the final hidden state a feature tap reads
            rows = [r for r, want in zip(x[0].split(sizes), logits) if want]
            heads = self._head(torch.cat(rows)[None])[0].split(
                [n for n, want in zip(sizes, logits) if want]) if rows else []
        for slot, n in zip(slots, sizes):
            slot.length += n
        it = iter(heads)
        return [next(it) if want else None for want in logits]

    def _attention(self, i: int, layer: "_Layer", h: torch.Tensor, cos, sin, slots, sizes) -> torch.Tensor:
        R, d = h.shape[1], self.head_dim
        q, k, v = layer.qkv(h)
        q = q.view(R, self.n_heads, d).transpose(0, 1)  # (H, R, d)
        k = k.view(R, self.n_kv, d).transpose(0, 1)  # (H_kv, R, d)
        v = v.view(R, self.n_kv, d).transpose(0, 1)
        q, k = _rotate(q, cos[0], sin[0]), _rotate(k, cos[0], sin[0])
        outs, row = [], 0
        for slot, n in zip(slots, sizes):
            outs.append(self._attend(slot, i, q[:, row : row + n], k[:, row : row + n], v[:, row : row + n]))
            row += n
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (H, R, d)
        return layer.o_proj(out.transpose(0, 1).reshape(1, R, self.n_heads * d))

    def _attend(self, slot: "Slot", i: int, q, k, v) -> torch.Tensor:
        """One sequence's new rows q (H, n, d) against its cache, after storing its new keys and values."""
        n, start = q.shape[1], slot.length
        end = start + n
        slot.k[i][:, start:end] = k
        slot.v[i][:, start:end] = v
        keys, values = slot.k[i], slot.v[i]
        if n > MAX_ROWWISE:  # prefill: one causal call; a mask when earlier tokens are cached
            mask = None
            if start:
                mask = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(start)
            keys, values = keys[:, :end], values[:, :end]
            if self.n_kv != self.n_heads:  # SDPA's grouped path on the CPU is its slow reference kernel:
                group = self.n_heads // self.n_kv  # give each query head its keys (a transient copy) instead
                keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
            return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask,
                                                  is_causal=mask is None)[0]
        # each row exactly as a one-token step computes it
        return torch.cat([_attend_row(q[:, r : r + 1], keys[:, : start + r + 1], values[:, : start + r + 1])
                          for r in range(n)], dim=1)  # (H, n, d)


def _attend_row(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One query row q (H, 1, d) against the keys and values (H_kv, T, d) it may see -> (H, 1, d).

    The query heads that share a key/value head (grouped-query attention: head h reads kv head
    h // (H / H_kv), as transformers' repeat_kv lays them out) are the rows of one small matmul
    against that head's keys, so the keys and values are never copied per query head. (SDPA's
    grouped path on the CPU falls back to its reference kernel, which repeats the keys and values
    of every layer at every step: 12 ms of a 65 ms step of the 0.5B, measured with torch.profiler.)
    The same shapes at every call for a given position keep a row's result independent of the
    other rows of its forward."""
    heads, _, d = q.shape
    kv = keys.shape[0]
    grouped = q.reshape(kv, heads // kv, d)  # (H_kv, g, d)
    scores = torch.bmm(grouped, keys.transpose(1, 2)).mul_(d ** -0.5)  # (H_kv, g, T)
    return torch.bmm(torch.softmax(scores, dim=-1), values).reshape(heads, 1, d)


class Slot:
    """The key/value cache of one sequence: per layer (n_kv, capacity, head_dim), grown by doubling;
    `length` tokens are valid (rollback only moves it)."""

    def __init__(self, decoder: FastDecoder):
        self.decoder = decoder
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def reserve(self, needed: int, like: torch.Tensor) -> None:
        dec = self.decoder
        capacity = self.k[0].shape[1] if self.k else 0
        if needed <= capacity:
            return
        new = max(needed, 2 * capacity, 256)
        if dec.max_length is not None:
            new = max(needed, min(new, dec.max_length))
        shape = (dec.n_kv, new, dec.head_dim)
        for store in (self.k, self.v):
            grown = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in dec._layers]
            for old, g in zip(store, grown):
                g[:, : self.length] = old[:, : self.length]
            store[:] = grown


class SlotView:
    """`ModelAdapter` over one slot of a FastDecoder: a sequence of its own on shared weights (one
    per request in batched decoding). Forwards through it run that sequence alone."""

    def __init__(self, decoder: FastDecoder, slot: Slot | None = None):
        self.decoder, self.slot = decoder, slot or decoder.new_slot()
        self.name, self.vocab_size, self.eos_token_ids = decoder.name, decoder.vocab_size, decoder.eos_token_ids
        self.max_length, self.device = decoder.max_length, decoder.device

    @property
    def model(self):
        return self.decoder.model

    @property
    def length(self) -> int:
        return self.slot.length

    def reset(self) -> None:
        self.slot.length = 0

    def rollback(self, length: int) -> None:
        check_rollback(self, length)
        self.slot.length = length

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        check_extend(self, ids)
        return self.decoder.extend_batch([self.slot], [ids])[0]

    def absorb(self, ids: torch.Tensor) -> None:
        check_extend(self, ids)
        self.decoder.extend_batch([self.slot], [ids], logits=[False])


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
    """h -> the outputs of `linears` (a tuple), neighbours of one kind (int8, Q4_K, Q6_K or Q5_0)
    fused into one kernel call (each output bit-identical to its own layer's): a Q4_K_M file mixes
    kinds within a layer (the 1.5B's q, k as Q4_K and v as Q6_K in half its layers; the 0.5B's q, k
    as Q5_0 and v as Q8_0, run as int8). Float layers stay separate: fusing them would copy their
    weights (the transformers model keeps its own)."""
    calls = [_fuse_run(list(run), exact_rows) for _, run in itertools.groupby(linears, key=type)]
    if len(calls) == 1:
        return calls[0]
    return lambda h: tuple(out for call in calls for out in call(h))


def _fuse_run(linears: list, exact_rows: bool):
    """h -> the outputs of `linears`, all of one type, as a tuple (one call where they fuse)."""
    from adaspec.models.extension import BlockLinear
    from adaspec.models.q4k import fuse_blocks
    from adaspec.models.quant import Int8Linear, fuse_int8

    if len(linears) > 1 and isinstance(linears[0], BlockLinear):
        fused = fuse_blocks(linears)
    elif len(linears) > 1 and isinstance(linears[0], Int8Linear):
        fused = fuse_int8(linears)
    else:
        fused = None
    if fused is None:
        calls = linears if exact_rows else [_one_call(m) for m in linears]
        return lambda h: tuple(m(h) for m in calls)
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
