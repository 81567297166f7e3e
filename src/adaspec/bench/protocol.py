"""What a benchmark method is: the context it is given, the run it returns, and why it may skip.

Kept apart from bench/methods.py (the registry and the built-in methods) so that method modules
such as bench/anchors.py depend on these records only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from adaspec.config import AdaspecError
from adaspec.records import TraceStep


class MethodSkipped(AdaspecError):
    """This method cannot run with these models (e.g. hf-* with the built-in toy models)."""


@dataclass
class MethodRun:
    """One generation by one method: what every method returns."""

    token_ids: list[int]  # new tokens only, EOS included when the generation ended on it
    wall_s: float  # wall-clock seconds of the whole generation (prefill included), tokenisation excluded
    new_tokens: int  # len(token_ids)
    finish_reason: str  # "length" | "eos" | "stop"
    lossless: bool  # whether the method claims to reproduce the target's own decoding exactly
    stats: dict | None = None  # adaspec `Stats.to_dict()`; None for transformers' generate
    trace: list[TraceStep] | None = None  # per-step trace when requested and available
    info: dict = field(default_factory=dict)  # effective settings worth recording (e.g. hf-assisted's schedule)


@dataclass
class MethodContext:
    """What a method is given; every method of one prompt sees the same prompt ids."""

    engine: object  # adaspec.api.Engine
    prompt_ids: list[int]
    options: dict  # flat knob options for `adaspec.api.make_config`, incl. max_new_tokens
    reference_ids: list[int] | None = None  # the `ar` output for this prompt (the oracle needs it)
    trace: bool = False  # record per-step traces where the method has them


MethodFn = Callable[[MethodContext], MethodRun]


@dataclass(frozen=True)
class BenchMethod:
    name: str
    fn: MethodFn
    needs_drafter: bool = True  # skipped when the engine has no drafter model
    needs_reference: bool = False  # run after `ar` on the same prompt, given its output
    description: str = ""
    defaults: dict = field(default_factory=dict)  # knob defaults, below the run's options
    check: Callable[[object], None] | None = None  # check(engine) raises MethodSkipped if it cannot run here
