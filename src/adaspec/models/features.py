"""The target's last hidden state at every position it scores, for drafters that read it (a draft
head, drafters/head.py), and the pieces of the target such a drafter shares (input embedding,
output head rows).

`FeatureTap(adapter)` hooks the module that produces the target's final normalised hidden state
(the input of its output head) and copies each forward's rows into a buffer indexed by position:
the rows are computed anyway, so prefill and verification expose them at the cost of one copy of
(n, hidden) floats. Rollback needs nothing: a position's row is overwritten when the position is
scored again, and `features(start, end)` only reads positions the adapter's cache holds.

Supported: transformers decoder models with ``.model.norm`` (Llama, Qwen2, Mistral, ...) and the
built-in toy models. The hook reads ``adapter.length`` as the first position of the forward, which
is what every adapter here has while its model runs (the length moves after the forward). Only the
adapter's own forwards (`extend`, `absorb`, which the tap wraps) are recorded: another caller of
the same model (the `hf-*` baselines run transformers' generate on it) leaves the rows alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from adaspec.config import AdaspecError


def final_norm(model: nn.Module) -> nn.Module | None:
    """The module whose output feeds the output head, or None if this model has no known one."""
    for path in ("model.norm", "ln_f", "transformer.ln_f"):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        return module
    return None


def input_embedding(model: nn.Module) -> nn.Module:
    """The model's token embedding: an nn.Embedding, or the GGUF file's own rows (models/packed.py)."""
    from adaspec.models.packed import GGUFEmbedding

    get = getattr(model, "get_input_embeddings", None)
    embed = get() if callable(get) else getattr(model, "wte", None)
    if not isinstance(embed, nn.Embedding | GGUFEmbedding):
        raise AdaspecError(f"{type(model).__name__} has no token embedding a draft head can share")
    return embed


def embedding_dtype(embed: nn.Module) -> torch.dtype:
    """The dtype an embedding's rows come out in."""
    return embed.weight.dtype if isinstance(embed, nn.Embedding) else embed.dtype


def embedding_values(embed: nn.Module, flat: torch.Tensor) -> torch.Tensor:
    """The values at flat indices `flat` of the (num_embeddings, embedding_dim) table, without
    de-quantising a packed table whole."""
    if isinstance(embed, nn.Embedding):
        return embed.weight.detach().reshape(-1)[flat]
    rows, where = torch.unique(flat // embed.embedding_dim, return_inverse=True)
    return embed.rows(rows)[where, flat % embed.embedding_dim]


def output_rows(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the model's output head as a float32 matrix (N, hidden): the float weights, or
    the de-quantised int8, Q6_K or Q5_0 weights when the head is quantised (models/quant.py,
    models/q6k.py, models/q5_0.py)."""
    from adaspec.models.extension import BlockLinear
    from adaspec.models.quant import Int8Linear

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "head", None)
    readable = isinstance(head, BlockLinear) and head.unpack_tiles is not None
    if not (readable or isinstance(head, Int8Linear | nn.Linear)):
        raise AdaspecError(f"{type(model).__name__} has no output head a draft head can share")
    if getattr(head, "bias", None) is not None and bool(head.bias.abs().gt(0).any()):
        raise AdaspecError("the target's output head has a bias, which a draft head does not model")
    if readable:  # the file's own values, de-quantised (q4k)
        return head.rows(ids.cpu()).contiguous()
    weight = head.weight_int8().dequantize() if isinstance(head, Int8Linear) else head.weight.detach()
    return weight[ids.to(weight.device)].float().contiguous()


class FeatureTap:
    """The target's final hidden state by position: ``features(start, end)`` -> (end - start, H)."""

    def __init__(self, adapter):
        model = getattr(adapter, "model", None)
        norm = final_norm(model) if isinstance(model, nn.Module) else None
        if norm is None:
            raise AdaspecError(f"{adapter.name}: a draft head needs the target's last hidden state, and this "
                               "model has no final norm adaspec knows (model.norm or ln_f)")
        self.adapter = adapter
        self._rows = torch.empty(0)
        self._active = False  # rows are kept only from the adapter's own forwards
        self._handle = norm.register_forward_hook(self._keep)
        for name in ("extend", "absorb"):
            own = getattr(adapter, name, None)
            if own is not None:
                setattr(adapter, name, self._recording(own))

    def _recording(self, forward):
        def run(ids):
            self._active = True
            try:
                return forward(ids)
            finally:
                self._active = False
        return run

    def _keep(self, module, args, output) -> None:
        if not self._active:  # another caller of the model (a baseline through transformers' generate)
            return
        rows = output[0] if output.ndim == 3 else output  # (n, H)
        start, n = self.adapter.length, rows.shape[0]
        with torch.inference_mode():
            if self._rows.shape[0] < start + n:
                grown = torch.empty(max(start + n, 2 * self._rows.shape[0], 256), rows.shape[-1], dtype=rows.dtype)
                if self._rows.numel():
                    grown[: self._rows.shape[0]] = self._rows
                self._rows = grown
            self._rows[start : start + n] = rows

    def features(self, start: int, end: int) -> torch.Tensor:
        if not 0 <= start <= end <= self.adapter.length:
            raise ValueError(f"features {start}..{end} asked of {self.adapter.name}, whose cache holds "
                             f"{self.adapter.length} positions")
        return self._rows[start:end]

    def close(self) -> None:
        self._handle.remove()
        for name in ("extend", "absorb"):
            self.adapter.__dict__.pop(name, None)


def tap(adapter) -> FeatureTap:
    """The adapter's FeatureTap, made once and kept on the adapter."""
    existing = getattr(adapter, "_feature_tap", None)
    if existing is None:
        existing = FeatureTap(adapter)
        adapter._feature_tap = existing
    return existing
