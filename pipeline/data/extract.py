"""Pulling the final answer out of a completion, robustly and without crashing.

Extractors, tried in the order a teacher's config lists them (`teacher.answer_extractors`):
`tag` an `<answer>…</answer>` tag, `phrase` the last "final answer is …", `last` the last number (tasks with
numeric answers) or last word (others). Nothing found is a format failure (None), never an error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

Extractor = Literal["tag", "phrase", "last"]
EXTRACTORS: tuple[Extractor, ...] = ("tag", "phrase", "last")

_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.I | re.S)
# the answer ends at a sentence's period (one followed by a space or the line's end), so "1.5." gives "1.5"
_PHRASE = re.compile(
    r"final answer\s*(?:is|:)\s*[:\s]*\**\s*\$?\\?(?:boxed\{)?([^\n]*?)\}?\$?\**\s*(?:\.(?=\s|$)|$)", re.I | re.M
)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def _tag(text: str, numeric: bool) -> str | None:
    found = _TAG.findall(text)
    return found[-1].strip() or None if found else None


def _phrase(text: str, numeric: bool) -> str | None:
    found = _PHRASE.findall(text)
    return found[-1].strip().strip("*").strip() or None if found else None


def _last(text: str, numeric: bool) -> str | None:
    found = (_NUMBER if numeric else _WORD).findall(text)
    if not found:
        return None
    return found[-1].replace(",", "") if numeric else found[-1]


_BY_NAME = {"tag": _tag, "phrase": _phrase, "last": _last}


def extract(text: str, numeric: bool, methods: Sequence[Extractor] = EXTRACTORS) -> tuple[str | None, str | None]:
    """(answer, the extractor that found it), or (None, None) when the completion gives no answer."""
    if not text or not text.strip():
        return None, None
    for name in methods:
        if (answer := _BY_NAME[name](text, numeric)) is not None:
            return answer, name
    return None, None


def extract_answer(text: str, numeric: bool, methods: Sequence[Extractor] = EXTRACTORS) -> str | None:
    """The answer a completion gives, or None when it gives none."""
    return extract(text, numeric, methods)[0]
