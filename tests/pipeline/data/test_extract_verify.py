from __future__ import annotations

import pytest

from pipeline.config import DataConfig
from pipeline.data.extract import extract_answer
from pipeline.data.sources import Prompt, reasoning_gym_prompts
from pipeline.data.verify import is_numeric, score


@pytest.mark.parametrize(
    ("text", "numeric", "expected"),
    [
        ("Reasoning... <answer> 42 </answer>", True, "42"),
        ("3 + 4 = 7. The final answer is 7.", True, "7"),
        ("so the final answer is: **-12**", True, "-12"),
        ("4.5 + 10 = 14.5. The final answer is 14.5.", True, "14.5"),
        ("The final answer is \\boxed{9}.", True, "9"),
        ("I think it's 1,234 apples", True, "1234"),
        ("The final answer is ainomma.", False, "ainomma"),
        ("Backwards it reads: tac", False, "tac"),
        ("   \n ", True, None),
        ("no digits at all", True, None),
        ("", False, None),
    ],
)
def test_extraction(text, numeric, expected):
    assert extract_answer(text, numeric) == expected


def test_every_default_task_accepts_the_right_answer_and_rejects_a_wrong_one():
    prompts = reasoning_gym_prompts(DataConfig(num_train_prompts=6, num_eval_prompts=3))["train"]
    assert {p.task for p in prompts} == {t.name for t in DataConfig().tasks}
    for p in prompts:
        right = f"Let me think. The final answer is {p.answer}."
        wrong = "The final answer is 999999." if is_numeric(p.task) else "The final answer is zzzz."
        assert score(p, extract_answer(right, is_numeric(p.task))) == 1.0, p
        assert score(p, extract_answer(wrong, is_numeric(p.task))) < 1.0, p
        assert score(p, None) == 0.0


def test_user_answers_use_math_verify_or_exact_match():
    math = Prompt("1", "user", "Half of one?", "1/2", "train")
    assert score(math, "0.5") == 1.0 and score(math, "\\frac{1}{2}") == 1.0 and score(math, "0.4") == 0.0
    text = Prompt("2", "user", "Capital of France?", "Paris", "train")
    assert score(text, " paris ") == 1.0 and score(text, "Lyon") == 0.0
