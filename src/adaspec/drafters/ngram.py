"""Prompt-lookup drafter: propose the tokens that followed the latest earlier occurrence of the
sequence's last n-gram. It costs no model forward, so it pays whenever the answer copies its
context (summaries, retrieval-augmented answers, code edits), and it is harmless when no match is
found (it proposes nothing).

Its drafts are deterministic, so their distribution p is one-hot (``Draft.probs = None``), which
keeps rejection sampling lossless at temperature > 0. It has no uncertainty of its own: its
signals report full confidence, and the length policy only bounds its draft through max_k.
"""

from __future__ import annotations

import torch

from adaspec.drafters.base import DraftContext
from adaspec.records import Draft, Signals


def find_match(seq: torch.Tensor, max_k: int, max_ngram: int = 3, min_ngram: int = 1) -> tuple[torch.Tensor, int]:
    """(tokens (<= max_k,), n): what followed the most recent earlier match of seq's last n-gram, and n.

    Longer n-grams are tried first (a longer match predicts better); ties go to the latest match
    (recent context predicts better). Returns an empty tensor and n = 0 if nothing matches. The
    drafter pool keys its acceptance estimates by n, since one-token matches are mostly wrong.
    """
    L = seq.shape[0]
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        tail = seq[L - n :]  # (n,)
        windows = seq[: L - 1].unfold(0, n, 1)  # (L - n, n): every n-gram that has a successor
        hits = (windows == tail).all(dim=1).nonzero().flatten()  # host sync: match positions
        if hits.numel():
            start = int(hits[-1]) + n
            return seq[start : min(start + max_k, L)], n
    return seq.new_zeros(0), 0


class NGramDrafter:
    name = "ngram"

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.vocab_size, self.max_ngram, self.min_ngram = vocab_size, max_ngram, min_ngram
        self.forwards = 0  # never runs a model
        self.signal_s = 0.0  # and computes no signals

    def begin(self, prompt: torch.Tensor) -> None:
        pass

    def lookup(self, seq: torch.Tensor, max_k: int) -> tuple[torch.Tensor, int]:
        """(continuation (<= max_k,), matched n-gram length n; 0 = no match) for seq (L,)."""
        if max_k <= 0:
            return seq.new_zeros(0), 0
        return find_match(seq, max_k, self.max_ngram, self.min_ngram)

    def draft(self, tokens: torch.Tensor) -> Draft:
        """Tokens (k,) as a Draft: one-hot p (probs None) and full-confidence signals."""
        one, zero = torch.tensor(1.0), torch.tensor(0.0)
        sig = Signals(entropy=zero, c_ent=one, c_logit=one, c_soft=one, confidence=one, p_token=one)
        return Draft(tokens=tokens, probs=None, signals=[sig] * len(tokens), drafter=self.name)

    def propose(self, seq: torch.Tensor, max_k: int, ctx: DraftContext | None = None) -> Draft:
        return self.draft(self.lookup(seq, max_k)[0])

    def commit(self, valid_len: int) -> None:
        pass
