"""The seeds benchmark's statistics: a task's mean over seeds with its two standard errors (over seeds, over
questions), against hand-computed values."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from quality_seeds import mean_se, parse_setting, summarize


def test_mean_and_both_standard_errors_by_hand():
    # 3 seeds x 4 questions: pass@1 per seed 0.75, 0.5, 0.25
    seeds = [
        {"q1": True, "q2": True, "q3": True, "q4": False},
        {"q1": True, "q2": True, "q3": False, "q4": False},
        {"q1": True, "q2": False, "q3": False, "q4": False},
    ]
    mean, se_seeds, se_questions = mean_se(seeds, ["q1", "q2", "q3", "q4"])
    assert mean == pytest.approx(0.5)
    assert se_seeds == pytest.approx(0.25 / math.sqrt(3))  # sample sd of (0.75, 0.5, 0.25) is 0.25
    # per-question accuracy over the seeds: 1, 2/3, 1/3, 0 -> population sd sqrt(5/36) (the binomial SE's
    # sqrt(p(1 - p)) when every seed agrees), over sqrt(4) questions
    assert se_questions == pytest.approx(math.sqrt(5 / 36) / 2)


def test_seeds_that_agree_have_no_seed_error_and_one_seed_has_none_to_report():
    same = {"a": True, "b": False}
    assert mean_se([same, same], ["a", "b"]) == (0.5, 0.0, pytest.approx(math.sqrt(0.5 * 0.5 / 2)))
    assert math.isnan(mean_se([same], ["a", "b"])[1])


def test_summary_is_per_task_and_overall_with_the_errors_added_in_quadrature():
    tasks = {"a1": "add", "a2": "add", "c1": "count", "c2": "count"}
    cells = [
        {"grades": {"student": {"a1": True, "a2": True, "c1": False, "c2": True}}},
        {"grades": {"student": {"a1": True, "a2": False, "c1": False, "c2": True}}},
    ]
    out = summarize(cells, tasks)
    assert set(out) == {"add", "count", "overall"}
    assert out["add"]["mean"] == pytest.approx(0.75) and out["count"]["mean"] == pytest.approx(0.5)
    assert out["overall"]["mean"] == pytest.approx(0.625)
    for figures in out.values():
        assert figures["se"] == pytest.approx(math.hypot(figures["se_seeds"], figures["se_questions"]))
    assert out["count"]["se_seeds"] == 0.0  # both seeds answered count alike


def test_a_setting_on_the_command_line_is_a_name_and_its_overrides():
    assert parse_setting("kd0.8=train.kd_alpha=0.8;distill.teacher_context=best") == (
        "kd0.8",
        ["train.kd_alpha=0.8", "distill.teacher_context=best"],
    )
    with pytest.raises(SystemExit, match="NAME=KEY=VALUE"):
        parse_setting("kd0.8")
