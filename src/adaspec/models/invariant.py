"""Batch-invariant attention for Hugging Face models: a query row's result never depends on how many
other rows share its forward.

Why it matters: lossless greedy speculation needs the target to score the k + 1 positions of a
verification forward exactly as it scores one position at a time. In float32 the two differ by
rounding (about 1e-5 in the logits) and outputs stay identical in practice. Quantised models
amplify that rounding: an activation that lands on the other side of an int8 rounding boundary
moves by a whole quantisation step, layer after layer, and the logits of Qwen2.5 int8 moved by
up to 0.8, enough to change greedy tokens. The int8 linear layers are exactly batch-invariant
(models/quant.py), so the remaining differences come from attention, where transformers takes
different code paths for one query row (GQA packing, no mask) and for several (repeated KV heads,
a causal mask).

The fix: every short forward (at most ``MAX_ROWWISE`` new tokens: decoding steps, verification,
drafter catch-up) computes attention one query row at a time, each row through exactly the call a
single-token decoding step makes: one query, the keys and values it may see (a contiguous prefix of
the cache), no mask. Long forwards (prefill) keep the stock batched kernel; a prompt is prefilled by
the same call whatever the method, so they need no invariance. Valid for batch size 1 without
padding and without sliding windows, which is how adaspec runs.
"""

from __future__ import annotations

import torch

NAME = "adaspec_rowwise"
MAX_ROWWISE = 64  # forwards with more new tokens than this are prefills


def rowwise_attention(module, query, key, value, attention_mask, **kwargs):
    """query (B, H, q, D), key/value (B, H_kv, T, D) -> ((B, q, H, D), None), one row at a time."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len > MAX_ROWWISE:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    rows = []
    for i in range(q_len):
        visible = kv_len - q_len + 1 + i  # row i sees the cache up to and including its own position
        k = key[:, :, :visible].contiguous()  # contiguous like the cache a decoding step reads
        v = value[:, :, :visible].contiguous()
        out, _ = sdpa_attention_forward(module, query[:, :, i : i + 1], k, v, None, is_causal=False, **kwargs)
        rows.append(out)  # (B, 1, H, D)
    return torch.cat(rows, dim=1), None


def make_batch_invariant(model) -> None:
    """Switch a transformers causal LM to row-wise attention for short forwards."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, rowwise_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # prefill uses the stock kernel and its mask
    model.set_attn_implementation(NAME)
