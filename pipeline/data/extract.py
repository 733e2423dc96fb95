"""Pulling the final answer out of a completion, robustly and without crashing.

Tried in order: an `<answer>…</answer>` tag, the last "final answer is …" phrase, then (for tasks with numeric
answers) the last number or (otherwise) the last word. Nothing found is a format failure (None), never an error.
"""

from __future__ import annotations

import re

_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.I | re.S)
_PHRASE = re.compile(r"final answer\s*(?:is|:)\s*[:\s]*\**\s*\$?\\?(?:boxed\{)?([^\n]*?)\}?\$?\**\s*(?:\.|$)", re.I | re.M)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def extract_answer(text: str, numeric: bool) -> str | None:
    """The answer a completion gives, or None when it gives none."""
    if not text or not text.strip():
        return None
    if m := _TAG.findall(text):
        return m[-1].strip() or None
    if m := _PHRASE.findall(text):
        answer = m[-1].strip().strip("*").strip()
        if answer:
            return answer
    pattern = _NUMBER if numeric else _WORD
    found = pattern.findall(text)
    return found[-1].replace(",", "") if numeric and found else (found[-1] if found else None)
