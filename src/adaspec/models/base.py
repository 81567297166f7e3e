"""The model adapter protocol: the only thing the decode loop knows about a model.

An adapter owns one KV cache for a single sequence (batch size 1). Its cache holds the first
`length` tokens of the sequence; `extend` appends tokens and returns the logits at each new
position; `rollback` forgets everything past a given length. Rollback moves a position: the
adapter may keep stale entries beyond it (they are masked or overwritten), never recompute.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from adaspec.config import AdaspecError


@runtime_checkable
class ModelAdapter(Protocol):
    name: str
    vocab_size: int  # width V of the logits
    eos_token_ids: tuple[int, ...]  # tokens that end a generation
    max_length: int | None  # context window in tokens, None if unbounded
    device: torch.device

    @property
    def length(self) -> int:
        """Number of tokens currently in the cache."""
        ...

    def reset(self) -> None:
        """Empty the cache (length becomes 0)."""
        ...

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ids (n,) to the cache and return the logits (n, V) at the n new positions."""
        ...

    def rollback(self, length: int) -> None:
        """Truncate the cache to its first `length` tokens (0 <= length <= self.length)."""
        ...


@runtime_checkable
class Tokenizer(Protocol):
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat conversation with the generation prompt appended."""
        ...

    def same_vocab(self, other: "Tokenizer") -> bool:
        """True when both map every token string to the same id."""
        ...


def absorb(adapter: ModelAdapter, ids: torch.Tensor) -> None:
    """Append ids to the adapter's cache when no logits are wanted (a prefill).

    An adapter may define ``absorb(ids)`` to skip its output head: for a long prompt the head is the
    costliest part of the forward (Qwen2.5-Coder-1.5B's 151936 x 1536 head over every prompt position).
    Adapters without it fall back to ``extend``."""
    own = getattr(adapter, "absorb", None)
    if own is not None:
        own(ids)
    else:
        adapter.extend(ids)


def check_extend(adapter: ModelAdapter, ids: torch.Tensor) -> int:
    """The number n of new tokens in ids (n,), after checking the shape and the context window."""
    if ids.ndim != 1 or ids.shape[0] == 0:
        raise ValueError(f"extend takes a 1-D tensor of at least one token id, got shape {tuple(ids.shape)}")
    n, cached = int(ids.shape[0]), adapter.length
    if adapter.max_length is not None and cached + n > adapter.max_length:
        raise AdaspecError(
            f"{adapter.name}: prompt + new tokens exceed the context of {adapter.max_length} tokens "
            f"({cached} cached + {n} new); shorten the prompt or lower max_new_tokens")
    return n


def check_rollback(adapter: ModelAdapter, length: int) -> None:
    if not 0 <= length <= adapter.length:
        raise ValueError(f"cannot roll {adapter.name} back to {length}: cache holds {adapter.length} tokens")
