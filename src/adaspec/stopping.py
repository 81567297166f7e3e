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
