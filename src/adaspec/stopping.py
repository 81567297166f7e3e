"""Stop strings: find where a stop string completes inside newly committed tokens.

A step may commit several tokens at once, so a stop string can complete in the middle of an
accepted draft. The checker reports how many generated tokens to keep (up to and including the
token that completes the stop string) and the text cut just before the stop string.
"""

from __future__ import annotations

from adaspec.models.base import Tokenizer


class StopStrings:
    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)

    def _find(self, text: str, start: int) -> int | None:
        hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def check(self, generated: list[int], n_new: int) -> tuple[int, str] | None:
        """generated: all new token ids so far; the last n_new were just committed.

        Returns (tokens to keep, text before the stop string) or None if no stop string completed.
        """
        if not self.stops:
            return None
        before = self.tokenizer.decode(generated[: len(generated) - n_new])
        # A stop string may straddle the step boundary, so search from slightly before it.
        start = max(0, len(before) - max(len(s) for s in self.stops))
        if self._find(self.tokenizer.decode(generated), start) is None:
            return None
        for m in range(len(generated) - n_new + 1, len(generated) + 1):
            text = self.tokenizer.decode(generated[:m])
            idx = self._find(text, start)
            if idx is not None:
                return m, text[:idx]
        return None  # unreachable: the full text contained a stop string


class Finish:
    """When a generation ends, and what of each step's committed tokens it keeps.

    Three things end it: max_new_tokens, an EOS token (which may arrive inside an accepted draft:
    it is kept, what follows it is dropped) and a stop string (`StopStrings`: the tokens up to the
    one completing it are kept, and the text before it becomes the result's text).
    """

    def __init__(self, max_new_tokens: int, eos: set[int], stop: StopStrings | None = None):
        self.max_new_tokens, self.eos, self.stop = max_new_tokens, eos, stop
        self.generated: list[int] = []
        self.reason: str | None = None  # "eos" | "stop"; "length" once the budget is spent
        self.text: str | None = None  # the text before the stop string, when one ended it

    @property
    def room(self) -> int:
        """How many more tokens may be generated."""
        return self.max_new_tokens - len(self.generated)

    @property
    def done(self) -> bool:
        return self.reason is not None or self.room <= 0

    @property
    def finish_reason(self) -> str:
        return self.reason or "length"

    def keep(self, new: list[int]) -> list[int]:
        """The part of a step's committed tokens that belongs to the output (all of it, or the
        part up to EOS, the token budget or the end of a stop string)."""
        for i, tok in enumerate(new):
            if tok in self.eos:
                new, self.reason = new[: i + 1], "eos"
                break
        new = new[: self.room]
        self.generated += new
        if self.stop is not None and (hit := self.stop.check(self.generated, len(new))) is not None:
            keep, self.text = hit
            new, self.reason = new[: len(new) - (len(self.generated) - keep)], "stop"
            self.generated = self.generated[:keep]
        return new
