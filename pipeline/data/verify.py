"""Scoring an extracted answer against the reference, per task.

reasoning-gym tasks use the task's own `score_answer`; user datasets use math-verify when the reference parses
as mathematics and exact match (whitespace- and case-insensitive) otherwise. Scores are in [0, 1].
"""

from __future__ import annotations

from pipeline.data.sources import Prompt

# reasoning-gym tasks whose answer is a single number, so "the last number" is a sound fallback for extraction
NUMERIC_TASKS = frozenset(
    {
        "basic_arithmetic",
        "chain_sum",
        "letter_counting",
        "decimal_arithmetic",
        "gsm_symbolic",
        "products",
        "count_bits",
        "gcd",
        "lcm",
    }
)


def is_numeric(task: str, reference: str = "") -> bool:
    """Whether a task's answers are single numbers (a user dataset's are when the reference answer is one)."""
    if task in NUMERIC_TASKS:
        return True
    try:
        float(reference.replace(",", ""))
    except ValueError:
        return False
    return True


def score(prompt: Prompt, answer: str | None) -> float:
    """The verifier's score for `answer` (None, a format failure, scores 0)."""
    if answer is None:
        return 0.0
    entry = prompt.metadata.get("entry")
    if entry is not None:  # a reasoning-gym task
        import reasoning_gym

        return float(reasoning_gym.get_score_answer_fn(prompt.task)(answer, entry))
    if " ".join(answer.split()).lower() == " ".join(prompt.answer.split()).lower():
        return 1.0
    from math_verify import parse, verify

    gold = parse(prompt.answer)
    return 1.0 if gold and verify(gold, parse(answer)) else 0.0
