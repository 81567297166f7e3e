"""The drafter protocol: anything that proposes draft tokens for the committed sequence.

A drafter sees the committed sequence (prompt + generated tokens, a 1-D tensor) and proposes up
to ``max_k`` tokens, consulting the length policy after each one. After verification the loop calls
``commit(valid_len)``: the first ``valid_len`` tokens of the committed sequence are final, and any
state the drafter keeps beyond that (a KV cache over rejected drafts) must be forgotten.
"""

from __future__ import annotations

from typing import Protocol

import torch

from adaspec.config import SamplingConfig, SpecConfig
from adaspec.policies.length import LengthPolicy
from adaspec.records import Draft


class Drafter(Protocol):
    name: str
    vocab_size: int

    def begin(self, prompt: torch.Tensor) -> None:
        """Start a new sequence from prompt ids (T,)."""
        ...

    def propose(
        self,
        seq: torch.Tensor,
        max_k: int,
        policy: LengthPolicy,
        sampling: SamplingConfig,
        spec: SpecConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        """Propose at most max_k tokens to follow seq (L,)."""
        ...

    def commit(self, valid_len: int) -> None:
        """The first valid_len tokens of the sequence are final; forget anything past them."""
        ...
