"""Grading held-out answers and the registry gate, without Ray (the full run is in test_train.py)."""

from __future__ import annotations

import pytest

from pipeline.data.generation import Generation
from pipeline.data.sources import Prompt
from pipeline.stages.evaluate import grade_row, summarize
from pipeline.student.registry import gate

EXTRACTORS = ["tag", "phrase", "last"]


def prompt(answer="7", task="basic_arithmetic"):
    return Prompt("p1", task, "What is 3 + 4?", answer, "eval", {})


def gen(text, finish="stop"):
    return Generation(text, 10, len(text.split()), finish, 0.1)


@pytest.mark.parametrize(
    "text, finish, correct, format_ok, reason",
    [
        ("3 + 4 = 7. The final answer is 7.", "stop", True, True, None),
        ("3 + 4 = 7", "stop", True, False, None),  # right, found as the last number, but not in the taught format
        ("The final answer is 8.", "stop", False, True, "wrong_answer"),
        ("I am not sure.", "stop", False, False, "no_answer"),
        ("3 + 4 = 7. The final answer is 7.", "length", False, True, "truncated"),  # cut off: never counted
    ],
)
def test_grading_is_the_rejection_samplers(text, finish, correct, format_ok, reason):
    row = grade_row("student", prompt(), gen(text, finish), EXTRACTORS)
    assert (row["correct"], row["format_ok"], row["reason"]) == (correct, format_ok, reason)


def test_summary_per_model_and_task():
    rows = [
        grade_row("teacher", prompt(), gen("The final answer is 7."), EXTRACTORS),
        grade_row("teacher", prompt(task="chain_sum"), gen("The final answer is 7."), EXTRACTORS),
        grade_row("student", prompt(), gen("The final answer is 7."), EXTRACTORS),
        grade_row("student", prompt(task="chain_sum"), gen("no idea"), EXTRACTORS),
    ]
    s = summarize(rows)
    assert s.teacher.pass_at_1 == 1.0 and s.student.pass_at_1 == 0.5
    assert s.student.pass_at_1_by_task == {"basic_arithmetic": 1.0, "chain_sum": 0.0}
    assert s.student.format_failure_rate == 0.5 and s.student.prompts == 2
    flat = s.to_metrics()  # the names dashboards and benchmarks read
    assert flat["student.pass_at_1.chain_sum"] == 0.0 and flat["teacher.pass_at_1"] == 1.0


def test_the_gate():
    assert gate(0.0, 0.0, None, 0.5, True) == (
        "challenger",
        "student pass@1 is 0: it solved none of the held-out prompts",
    )
    assert gate(0.4, 0.5, None, 0.5, True)[0] == "champion"
    alias, reason = gate(0.2, 0.5, None, 0.5, True)
    assert alias == "challenger" and "< gate_ratio 0.5 x teacher pass@1 0.500" in reason
    alias, reason = gate(0.4, 0.5, 0.45, 0.5, True)
    assert alias == "challenger" and "current champion's 0.450" in reason
    assert gate(0.4, 0.5, 0.45, 0.5, False)[0] == "champion"
    assert gate(0.5, 0.5, 0.45, 0.5, True) == (
        "champion",
        "student pass@1 0.500 >= gate_ratio 0.5 x teacher pass@1 0.500 and >= current champion's 0.450",
    )


def test_the_constant_answer_floor_is_the_most_frequent_reference_answer_per_task():
    answers = {"letter_counting": ["1", "1", "1", "2"], "chain_sum": ["5", "6", "7", "8", "5"]}
    rows = [
        grade_row(m, Prompt(f"p{i}", task, "q", a, "eval", {}), gen(f"The final answer is {a}."), EXTRACTORS)
        for m in ("teacher", "student")
        for task, refs in answers.items()
        for i, a in enumerate(refs)
    ]
    summary = summarize(rows)
    floor = summary.floor
    assert floor is not None and floor.pass_at_1_by_task == {"chain_sum": 0.4, "letter_counting": 0.75}
    assert floor.answer_by_task == {"chain_sum": "5", "letter_counting": "1"}
    assert floor.pass_at_1 == pytest.approx(5 / 9)
    assert "floor.pass_at_1.letter_counting" in summary.to_metrics()
    assert not any("answer" in k for k in summary.to_metrics())  # strings are no metrics: the answers are a tag


def test_the_gate_needs_the_teachers_pass_at_1_and_to_beat_the_floor_on_every_task():
    floor = {"letter_counting": 0.785, "chain_sum": 0.065}
    # the measured student: above the teacher overall, "winning" letter counting by always answering 1
    alias, reason = gate(0.273, 0.227, None, 1.0, True, {"letter_counting": 0.6, "chain_sum": 0.1}, floor)
    assert alias == "challenger"
    assert reason == "student does not beat the constant-answer floor on letter_counting 0.600 <= floor 0.785"
    alias, reason = gate(0.5, 0.227, None, 1.0, True, {"letter_counting": 0.9, "chain_sum": 0.1}, floor)
    assert alias == "champion" and "beats the constant-answer floor on every task" in reason
    alias, reason = gate(0.2, 0.227, None, 1.0, True, {"letter_counting": 0.9, "chain_sum": 0.1}, floor)
    assert alias == "challenger" and "< gate_ratio 1 x teacher pass@1 0.227" in reason


def test_decode_throughput_is_measured_warm_and_interleaved_for_both_models_at_each_batch_size():
    from pipeline.model.config import model_preset
    from pipeline.model.transformer import Transformer
    from pipeline.stages.evaluate import decode_throughput
    from tests.pipeline.model.convert.test_convert import llama

    student = Transformer(model_preset("toy", vocab_size=96, n_layers=2)).eval()
    teacher = llama()
    calls: list[tuple[str, int]] = []  # (model, batch) of every forward, in order
    student.register_forward_pre_hook(lambda m, a, kw: calls.append(("student", a[0].shape[0])), with_kwargs=True)
    teacher.register_forward_pre_hook(
        lambda m, a, kw: calls.append(("teacher", kw["input_ids"].shape[0])), with_kwargs=True
    )
    speeds = decode_throughput(student, teacher, [5, 6, 7], (1, 4), 6, rounds=2)
    assert sorted(speeds) == [1, 4]
    assert all(0 < v < float("inf") for s in speeds.values() for v in (s.student, s.teacher))
    # per batch size: 1 warm-up + 2 timed rounds, each of a prefill and of a prefill set-up then 6 decode steps,
    # the two models taking turns every round (12 turns: 3 rounds x 2 phases x 2 models)
    for b in (1, 4):
        mine = [name for name, batch in calls if batch == b]
        assert mine.count("student") == mine.count("teacher") == 3 * (1 + 1 + 6)
        turns = [name for i, name in enumerate(mine) if i == 0 or mine[i - 1] != name]
        assert turns == ["student", "teacher"] * 6
    (remote,) = decode_throughput(student, None, [5, 6], (2,), 3).items()  # a remote teacher: the student's alone
    assert remote[0] == 2 and remote[1].student > 0 and remote[1].teacher is None
