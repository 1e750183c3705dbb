"""Streaming text for one request: incremental detokenization and stop strings.

Stop strings can straddle token boundaries and a token can end in the middle of a UTF-8
character, so text is released only when it is final: an incomplete character is held until its
next byte arrives, and a tail that could still grow into a stop string is held until it cannot
(or the request ends). Text after a stop string is never released.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing token list into text deltas (the prefix/read-offset scheme: a window of
    already-decoded tokens gives each new token its correct leading space and merges)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is left at the end, incomplete characters included (as U+FFFD)."""
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix :], skip_special_tokens=True)
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopStringFilter:
    """Releases text up to (never including) the first stop string, holding back possible prefixes."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._text = ""
        self._released = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add decoded text; return what can be released now. Sets :attr:`stopped` on a match."""
        if self.stopped:
            return ""
        if not self._stop:
            return delta
        self._text += delta
        # A match can only end inside the new text, so search from where it could begin.
        search_from = max(0, self._released - self._longest + 1)
        hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._cut(min(hits))
        return self._cut(len(self._text) - self._held_tail())

    def flush(self) -> str:
        """At the end of generation: the held tail is final text."""
        if self.stopped:
            return ""
        return self._cut(len(self._text))

    def _held_tail(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        text = self._text
        for n in range(min(self._longest - 1, len(text) - self._released), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _cut(self, end: int) -> str:
        end = max(end, self._released)
        out = self._text[self._released : end]
        self._released = end
        return out
