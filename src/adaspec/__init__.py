"""adaspec: adaptive speculative decoding.

A small drafter proposes tokens, the target verifies them in one forward pass, and the drafter's
own uncertainty (entropy, logit margin, softmax margin) decides how far to speculate and how
strictly to verify. Greedy and rejection-sampling verification are lossless.
"""

from adaspec.api import Engine, Stream, generate, load, make_config
from adaspec.config import METHODS
from adaspec.config import AdaspecError, GenerationConfig, SamplingConfig, SpecConfig
from adaspec.records import Draft, Result, Signals, Stats, StepOutcome, TraceStep, Verdict

__version__ = "0.1.0"

__all__ = [
    "AdaspecError", "Draft", "Engine", "GenerationConfig", "METHODS", "Result", "SamplingConfig", "Signals",
    "SpecConfig", "Stats", "StepOutcome", "Stream", "TraceStep", "Verdict", "generate", "load", "make_config",
]
