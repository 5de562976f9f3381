"""From token ids to text, incrementally, with stop sequences.

A streamed sequence must never show text it later takes back: a token may end in the middle of a UTF-8
character (byte-level BPE), and the text may end with the first characters of a stop sequence. Both are
held back until the next tokens settle them.
"""

from __future__ import annotations

from typing import Any


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop sequence (it may still become one)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Index of the earliest stop sequence in ``text`` at or after ``start``; -1 when none is there."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else -1


class TextStream:
    """The text of one sequence as tokens arrive.

    Args:
        tokenizer: decodes token ids (``decode(ids, skip_special_tokens=True)``).
        stops: stop sequences; the text ends before the first one.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.sent = 0
        """Characters of the text already handed out."""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final (possibly empty). Sets ``stopped`` at a stop."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stops:
            # A stop can only begin in text not yet sent, or in the part held back before it.
            longest = max(len(s) for s in self.stops)
            at = find_stop(text, self.stops, max(0, self.sent - longest + 1))
            if at >= 0:
                self.stopped = True
                return self._take(text, at)
        end = len(text)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            end = len(text.rstrip("\ufffd"))
        end -= held_back(text[:end], self.stops)
        return self._take(text, end)

    def flush(self) -> str:
        """The text still held back (the sequence ended for another reason than a stop)."""
        if self.stopped or not self.ids:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        out = text[self.sent : end]
        self.sent = end
        return out
