"""Rejection sampling: grade every teacher sample, keep the good ones, and say why each other one was dropped.

A sample is accepted when the teacher finished on its own (not cut off at `max_new_tokens`), an answer could be
extracted, and the task's verifier scores it at least `threshold`; then, per prompt, exact duplicate completions
and samples past `max_accepted_per_prompt` are turned away. Rejected samples are kept with their reason, never
dropped, so acceptance is auditable per task and per reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.data.extract import Extractor, extract
from pipeline.data.generation import Generation
from pipeline.data.prompts import canonical_completion
from pipeline.data.sources import Prompt
from pipeline.data.verify import is_numeric, score

# in the order they are checked; the first that applies is the sample's reason
REJECT_REASONS = ("bad_prompt", "teacher_error", "truncated", "no_answer", "wrong_answer", "duplicate", "over_quota")


@dataclass
class Verdict:
    completion: str  # the text the student trains on (canonical answer line when accepted and asked for)
    answer: str | None
    answer_source: str | None  # the extractor that found the answer
    score: float
    accepted: bool
    reason: str | None  # one of REJECT_REASONS, None when accepted


def judge(
    prompt: Prompt, gen: Generation, extractors: Sequence[Extractor], threshold: float, canonical: bool
) -> Verdict:
    """Grade one sample on its own (duplicates and quotas are per prompt: see `select`)."""
    if gen.finish_reason in ("bad_prompt", "error"):
        reason = "bad_prompt" if gen.finish_reason == "bad_prompt" else "teacher_error"
        return Verdict(gen.text, None, None, 0.0, False, reason)
    answer, source = extract(gen.text, is_numeric(prompt.task, prompt.answer), extractors)
    value = score(prompt, answer)
    if gen.finish_reason == "length":
        return Verdict(gen.text, answer, source, value, False, "truncated")
    if answer is None:
        return Verdict(gen.text, None, None, 0.0, False, "no_answer")
    if value < threshold:
        return Verdict(gen.text, answer, source, value, False, "wrong_answer")
    text = canonical_completion(gen.text, answer, source) if canonical else gen.text
    return Verdict(text, answer, source, value, True, None)


def select(verdicts: list[Verdict], max_accepted: int) -> list[Verdict]:
    """Apply the per-prompt rules to one prompt's verdicts, in sample order: no duplicate text, at most N kept."""
    seen: set[str] = set()
    kept = 0
    for v in verdicts:
        if not v.accepted:
            continue
        if v.completion in seen:
            v.accepted, v.reason = False, "duplicate"
        elif kept >= max_accepted:
            v.accepted, v.reason = False, "over_quota"
        else:
            seen.add(v.completion)
            kept += 1
    return verdicts
