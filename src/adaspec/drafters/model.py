"""A drafter backed by a (small) language model through the adapter protocol."""

from __future__ import annotations

import torch

from adaspec.drafters.base import DraftBuilder, DraftContext, DraftSteps, run_steps
from adaspec.models.base import ModelAdapter, absorb
from adaspec.records import Draft


class ModelDrafter:
    """Drafts token by token with a model, keeping its KV cache in step with the sequence.

    Cache invariant: the cache holds a prefix of the committed sequence (plus, during a step, the
    drafts fed so far). Each ``propose`` first feeds every committed token the cache has not seen:
    usually one (the last corrected or bonus token), two when the whole previous draft was accepted
    (the drafter never fed its own last draft token), more after a prefill of ``prompt[:-1]``.

    context: read at most this many of the prompt's last tokens (None: all). The cache then holds
    ``seq[offset:]``. Prefilling a long prompt is a cost plain decoding never pays; a shorter
    context only changes what is proposed, never what is committed.

    lazy: ``begin`` reads nothing; the first draft feeds the prompt with its first forward. The
    batch scheduler (batching.py) uses this: the drafter's prompt forwards of the requests joining
    together then run in one batched forward with the others' drafts, and a request whose
    load-aware cap stays at zero never pays for a drafter prefill.
    """

    def __init__(self, adapter: ModelAdapter, name: str | None = None, context: int | None = None,
                 lazy: bool = False):
        if context is not None and context < 1:
            raise ValueError(f"a drafter's context must be at least 1 token, got {context}")
        self.adapter = adapter
        self.name = name or "model"
        self.vocab_size = adapter.vocab_size
        self.context = context
        self.lazy = lazy
        self.offset = 0  # sequence position of the drafter's first cached token
        self.forwards = 0
        self.signal_s = 0.0  # time spent on signals and policy decisions (overhead accounting)
        # a pruned drafting vocabulary (drafters/vocab.py): column j of the logits is token draft_ids[j]
        self.draft_ids = getattr(adapter, "draft_ids", None)

    def begin(self, prompt: torch.Tensor) -> None:
        self.adapter.reset()
        self.offset = max(0, prompt.shape[0] - self.context) if self.context is not None else 0
        if not self.lazy and prompt.shape[0] - self.offset > 1:
            absorb(self.adapter, prompt[self.offset : -1])
            self.forwards += 1

    def propose(self, seq: torch.Tensor, max_k: int, ctx: DraftContext) -> Draft:
        return run_steps(self.steps(seq, max_k, ctx))

    def steps(self, seq: torch.Tensor, max_k: int, ctx: DraftContext) -> DraftSteps:
        """`propose` one forward at a time (drafters/base.py): yields (adapter, ids), gets the logits."""
        feed = seq[self.offset + self.adapter.length :]  # (n,) committed tokens not yet in the cache
        build = DraftBuilder(ctx, self.vocab_size, self.draft_ids)
        for _ in range(max_k):
            logits = (yield self.adapter, feed)[-1]  # (V,), or (N,) over a pruned vocabulary
            self.forwards += 1
            token, keep = build.add(logits, max_k)
            if not keep:
                break
            feed = token.reshape(1)
        self.signal_s += build.signal_s
        return build.draft(seq.device, self.name)

    def commit(self, valid_len: int) -> None:
        self.adapter.rollback(min(self.adapter.length, valid_len - self.offset))
