"""Grading teacher samples: each reject reason, canonical answers, per-prompt duplicates and quotas."""

from __future__ import annotations

from pipeline.config import DataConfig
from pipeline.data.generation import Generation
from pipeline.data.prompts import few_shot_questions, student_messages, teacher_messages
from pipeline.data.rejection import judge, select
from pipeline.data.sources import Prompt, reasoning_gym_prompts

ADD = Prompt("p1", "user", "What is 2 + 3?", "5", "train")
ALL = ("tag", "phrase", "last")


def gen(text, finish="stop", error=None):
    return Generation(text, 10, len(text.split()), finish, 0.1, error)


def test_each_reject_reason():
    cases = {
        "teacher_error": gen("", "error", "HTTP 500: boom (after 4 attempts)"),
        "bad_prompt": gen("", "bad_prompt", "prompt too long: 9000 tokens + max_new_tokens 8 exceed the context"),
        "truncated": gen("2 + 3 = 5. 5 + 0 = 5. 5 + 0", "length"),
        "no_answer": gen("I am not sure."),
        "wrong_answer": gen("2 + 3 = 6. The final answer is 6."),
    }
    for reason, g in cases.items():
        v = judge(ADD, g, ALL, 1.0, True)
        assert (v.accepted, v.reason) == (False, reason), reason
    ok = judge(ADD, gen("2 + 3 = 5. The final answer is 5."), ALL, 1.0, True)
    assert (ok.accepted, ok.reason, ok.answer, ok.answer_source) == (True, None, "5", "phrase")


def test_accepted_answers_end_in_the_canonical_line_and_extractors_are_per_teacher():
    v = judge(ADD, gen("2 plus 3 makes 5"), ALL, 1.0, True)
    assert v.accepted and v.completion == "2 plus 3 makes 5. The final answer is 5."
    assert judge(ADD, gen("2 plus 3 makes 5"), ALL, 1.0, False).completion == "2 plus 3 makes 5"
    strict = judge(ADD, gen("2 plus 3 makes 5"), ("tag", "phrase"), 1.0, True)
    assert (strict.accepted, strict.reason) == (False, "no_answer")


def test_duplicates_and_quota_per_prompt():
    texts = [
        "The final answer is 5.",
        "The final answer is 5.",
        "So 5. The final answer is 5.",
        "The final answer is 4.",
        "Five: The final answer is 5.",
    ]
    verdicts = select([judge(ADD, gen(t), ALL, 1.0, True) for t in texts], max_accepted=2)
    assert [(v.accepted, v.reason) for v in verdicts] == [
        (True, None),
        (False, "duplicate"),
        (True, None),
        (False, "wrong_answer"),
        (False, "over_quota"),
    ]


def test_few_shot_examples_are_in_neither_split_and_the_student_sees_no_examples():
    shown = {" ".join(q.lower().split()) for q in few_shot_questions()}
    splits = reasoning_gym_prompts(DataConfig(num_train_prompts=300, num_eval_prompts=60))
    asked = {" ".join(p.question.lower().split()) for s in splits.values() for p in s}
    assert not shown & asked
    p = splits["train"][0]
    assert len(teacher_messages(p.task, p.question)) == 6  # instruction, two worked examples, the question
    assert student_messages(p.question) == [
        teacher_messages(p.task, p.question)[0],
        teacher_messages(p.task, p.question)[-1],
    ]
