"""Drafters: anything that proposes draft tokens (a small model, prompt lookup, a pool of both)."""

from adaspec.drafters.base import DraftContext, Drafter, SignalSettings
from adaspec.drafters.model import ModelDrafter
from adaspec.drafters.ngram import NGramDrafter
from adaspec.drafters.pool import DrafterPool

__all__ = ["DraftContext", "Drafter", "DrafterPool", "ModelDrafter", "NGramDrafter", "SignalSettings"]
