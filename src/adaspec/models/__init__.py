"""Model adapters: the protocol the decode loop speaks, a tiny built-in GPT, and transformers."""

from adaspec.models.base import ModelAdapter, Tokenizer, check_rollback
from adaspec.models.hf import HFAdapter, HFTokenizer, load_hf
from adaspec.models.tiny import (
    ByteTokenizer,
    TinyAdapter,
    TinyConfig,
    TinyGPT,
    perturbed_copy,
    random_model,
    tiny_model,
)

__all__ = [
    "ModelAdapter",
    "Tokenizer",
    "check_rollback",
    "TinyConfig",
    "TinyGPT",
    "TinyAdapter",
    "ByteTokenizer",
    "tiny_model",
    "perturbed_copy",
    "random_model",
    "HFAdapter",
    "HFTokenizer",
    "load_hf",
]
