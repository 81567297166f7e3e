"""Drafters: anything that proposes draft tokens (a small model; later n-gram lookup, early exit)."""

from adaspec.drafters.base import Drafter
from adaspec.drafters.model import ModelDrafter

__all__ = ["Drafter", "ModelDrafter"]
