"""Incremental detokenization of one generated choice, with OpenAI stop strings."""

from __future__ import annotations


class TextStream:
    """Incremental detokenization of one choice, with OpenAI stop strings.

    Text is released only once it can no longer be the start of a stop string (the last `len(stop) - 1`
    characters are held back) and never in the middle of a multi-byte character; the stop string itself is not
    part of the output.
    """

    def __init__(self, tokenizer, stops: list[str], skip_ids: set[int]):
        self.tokenizer, self.stops, self.skip_ids = tokenizer, stops, skip_ids
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters released so far
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        """(newly releasable text, whether a stop string was reached)."""
        if token not in self.skip_ids:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = max(min(hits), self.sent)
            return self._release(text[:cut], cut), True
        return self._release(text, max(self.sent, len(text) - self.holdback)), False

    def flush(self) -> str:
        """Everything not released yet (the sequence ended without a stop string)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(text, len(text))

    def _release(self, text: str, upto: int) -> str:
        self.text = text[:upto]
        delta, self.sent = text[self.sent : upto], upto
        return delta
