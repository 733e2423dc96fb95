"""The typed stage results: conversion.json, summary.json and register's and serve's files as the stages write
them, read and written back unchanged, and flattened to the MLflow metric names that dashboards and benchmarks
read."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pipeline.stages.results import (
    FLOOR_ANSWERS_TAG,
    ConversionReport,
    DecodeSpeed,
    Endpoint,
    EvaluationSummary,
    Exports,
    Fidelity,
    Recovery,
    Registration,
    SummaryEconomics,
    read_conversion,
    read_result,
    read_summary,
    write_conversion,
    write_result,
    write_summary,
)

ECONOMICS = {
    "student_params_total": 301_989_888,
    "student_params_active": 190_840_832,
    "student_params_active_nonembedding": 162_529_280,
    "student_params_embedding": 28_311_552,
    "teacher_params_total": 134_515_008,
    "teacher_params_nonembedding": 106_203_456,
    "teacher_params_embedding": 28_311_552,
    "active_param_ratio": 1.5303,
    "student_cache_floats_per_token": 8640,
    "teacher_cache_floats_per_token": 11520,
    "cache_ratio": 0.75,
}
# conversion.json as stage convert writes it for a converted, recovered student: one flat record
CONVERTED = {
    "init": "teacher",
    "teacher": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "layers": [0, 2, 5],
    "rope_pairs": [[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[0, 2], [1, 3]]],
    "block_importance": [0.91, 0.12, 0.08, 0.05, 0.04, 0.3],
    "calibration_samples": 40,
    "held_out_samples": 8,
    "kl_to_teacher": 0.412,
    "student_ppl": 7.9,
    "teacher_ppl": 4.2,
    "held_out_tokens": 1024,
    "calibration_tokens": 5120,
    "recovery_tokens": 2048,
    "recovery_seconds": 12.5,
    "recovery_tokens_per_s": 163.84,
    "kl_to_teacher_converted": 1.37,
    "student_ppl_converted": 15.2,
    **ECONOMICS,
}


def model_result(pass_at_1, by_task, tokens=41.5):
    return {
        "pass_at_1": pass_at_1,
        "pass_at_1_by_task": by_task,
        "mean_completion_tokens": tokens,
        "format_failure_rate": 0.25,
        "truncated_rate": 0.125,
        "prompts": 8,
    }


# summary.json as stage evaluate writes it: the costs (no embedding counts) and KL from conversion.json, and the
# decode speeds of both models per batch size, flat under `economics`
SUMMARY = {
    "teacher": model_result(0.25, {"chain_sum": 0.0, "letter_counting": 0.5}),
    "teacher_best": model_result(0.5, {"chain_sum": 0.25, "letter_counting": 0.75}),
    "student": model_result(0.375, {"chain_sum": 0.25, "letter_counting": 0.5}, tokens=12.0),
    "floor": {
        "pass_at_1": 0.5,
        "pass_at_1_by_task": {"chain_sum": 0.25, "letter_counting": 0.75},
        "answer_by_task": {"chain_sum": "12", "letter_counting": "1"},
    },
    "economics": {
        **{k: v for k, v in ECONOMICS.items() if not k.endswith("_embedding")},
        "kl_to_teacher": 0.412,
        "student_decode_tokens_per_s_batch1": 31.5,
        "teacher_decode_tokens_per_s_batch1": 40.25,
        "student_decode_tokens_per_s_batch16": 310.0,
        "teacher_decode_tokens_per_s_batch16": 290.5,
    },
}
# the evaluate run's metrics: the names the dashboard, the benchmarks and the tests of other stages read
METRIC_NAMES = {
    *(
        f"{who}.{name}"
        for who in ("teacher", "teacher_best", "student")
        for name in ("mean_completion_tokens", "format_failure_rate", "truncated_rate", "prompts")
    ),
    *(
        f"{who}.pass_at_1{task}"
        for who in ("teacher", "teacher_best", "student", "floor")
        for task in ("", ".chain_sum", ".letter_counting")
    ),
    *(f"economics.{k}" for k in SUMMARY["economics"]),
}


def test_a_summary_reads_typed_and_writes_back_the_same_file(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY, indent=2, sort_keys=True))
    summary = read_summary(tmp_path)
    assert summary.student.pass_at_1_by_task == {"chain_sum": 0.25, "letter_counting": 0.5}
    assert summary.teacher_best is not None and summary.teacher_best.pass_at_1 == 0.5
    assert summary.floor is not None and summary.floor.answer_by_task["chain_sum"] == "12"
    econ = summary.economics
    assert econ.costs is not None and econ.costs.cache_ratio == 0.75 and econ.kl_to_teacher == 0.412
    assert econ.decode_tokens_per_s == {
        1: DecodeSpeed(student=31.5, teacher=40.25),
        16: DecodeSpeed(student=310.0, teacher=290.5),
    }
    assert list(summary.models()) == ["teacher", "teacher_best", "student"] and summary.tasks() == [
        "chain_sum",
        "letter_counting",
    ]
    out = tmp_path / "again"
    out.mkdir()
    write_summary(out, summary)
    assert (out / "summary.json").read_text() == (tmp_path / "summary.json").read_text()


def test_a_summary_as_metrics_keeps_the_metric_names_and_comes_back_from_mlflows_floats():
    summary = EvaluationSummary.from_json(SUMMARY)
    metrics = summary.to_metrics()
    assert set(metrics) == METRIC_NAMES
    assert metrics["teacher.pass_at_1.letter_counting"] == 0.5 and metrics["floor.pass_at_1"] == 0.5
    assert metrics["economics.student_decode_tokens_per_s_batch16"] == 310.0
    assert summary.to_tags() == {FLOOR_ANSWERS_TAG: '{"chain_sum": "12", "letter_counting": "1"}'}
    # MLflow keeps every metric as a float, beside the run's other metrics
    logged = {k: float(v) for k, v in metrics.items()} | {"progress.done": 8.0, "progress.total": 8.0}
    assert EvaluationSummary.from_metrics(logged, summary.to_tags()) == summary
    # a run that did not tag the floor's answers still reads, without them
    untagged = EvaluationSummary.from_metrics(logged)
    assert untagged is not None and untagged.floor is not None and untagged.floor.answer_by_task == {}
    assert EvaluationSummary.from_metrics({"progress.done": 3.0}) is None  # an evaluation still running


def test_a_summary_from_before_the_best_prompt_floor_and_economics_reads_without_them():
    old = {"teacher": SUMMARY["teacher"], "student": SUMMARY["student"]}
    summary = EvaluationSummary.from_json(old)
    assert summary.teacher_best is None and summary.floor is None and summary.economics == SummaryEconomics()
    assert list(summary.models()) == ["teacher", "student"]
    assert EvaluationSummary.from_metrics(summary.to_metrics()) == summary


def test_a_broken_summary_is_an_error_naming_what_is_wrong():
    with pytest.raises(ValidationError, match=r"student\.truncated_rate"):
        EvaluationSummary.from_json({**SUMMARY, "student": {**SUMMARY["student"], "truncated_rate": None}})
    metrics = EvaluationSummary.from_json(SUMMARY).to_metrics()
    del metrics["teacher.prompts"]
    with pytest.raises(ValidationError, match=r"teacher\.prompts\n  Field required"):
        EvaluationSummary.from_metrics(metrics)
    with pytest.raises(ValueError, match="unknown economics: student_decode_tokens_per_s"):
        EvaluationSummary.from_json({**SUMMARY, "economics": {"student_decode_tokens_per_s": 3.0}})


def test_a_remote_teachers_summary_has_the_students_speed_alone():
    econ = SummaryEconomics(decode_tokens_per_s={4: DecodeSpeed(student=12.0)})
    assert econ.to_json() == {"student_decode_tokens_per_s_batch4": 12.0}
    assert SummaryEconomics.from_json(econ.to_json()) == econ


def test_a_conversion_report_reads_typed_and_writes_back_the_same_file(tmp_path):
    (tmp_path / "conversion.json").write_text(json.dumps(CONVERTED, indent=2, sort_keys=True))
    report = read_conversion(tmp_path)
    assert report.init == "teacher" and report.layers == [0, 2, 5] and report.rope_pairs == CONVERTED["rope_pairs"]
    assert report.fidelity == Fidelity(
        kl_to_teacher=0.412, student_ppl=7.9, teacher_ppl=4.2, held_out_tokens=1024, calibration_tokens=5120
    )
    assert report.recovery is not None and report.recovery.kl_to_teacher_converted == 1.37
    assert report.economics is not None and report.economics.student_params_embedding == 28_311_552
    out = tmp_path / "again"
    out.mkdir()
    write_conversion(out, report)
    assert (out / "conversion.json").read_text() == (tmp_path / "conversion.json").read_text()
    # convert's metrics: every measurement under its name; the record's description and sample counts are none
    header = {"init", "teacher", "layers", "rope_pairs", "block_importance", "calibration_samples", "held_out_samples"}
    assert report.to_metrics() == {k: v for k, v in CONVERTED.items() if k not in header}
    # what evaluate reports beside pass@1: the costs without the embedding counts, the KL before training
    econ = SummaryEconomics.of(report, {})
    assert econ.to_json() == {k: v for k, v in SUMMARY["economics"].items() if "decode" not in k}


def test_a_conversion_without_recovery_or_from_scratch_reads_as_such(tmp_path):
    plain = {k: v for k, v in CONVERTED.items() if k not in Recovery.model_fields}
    report = ConversionReport.from_json(plain)
    assert report.recovery is None and report.fidelity is not None and report.to_json() == plain
    write_conversion(tmp_path, ConversionReport(init="scratch"))
    assert json.loads((tmp_path / "conversion.json").read_text()) == {"init": "scratch"}
    scratch = read_conversion(tmp_path)
    assert scratch.economics is None and scratch.to_metrics() == {}
    assert SummaryEconomics.of(scratch, {}) == SummaryEconomics()  # nothing to compare with a teacher


def test_a_broken_conversion_report_is_an_error_naming_what_is_wrong():
    partial = {k: v for k, v in CONVERTED.items() if k != "teacher_ppl"}
    with pytest.raises(ValidationError, match="teacher_ppl\n  Field required"):
        ConversionReport.from_json(partial)
    with pytest.raises(ValidationError, match="kept_layers\n  Extra inputs are not permitted"):
        ConversionReport.from_json({**CONVERTED, "kept_layers": [0]})
    with pytest.raises(ValidationError, match="init"):
        ConversionReport.from_json({**CONVERTED, "init": "distilled"})


REGISTRATION = {
    "name": "moeforge-student",
    "version": 3,
    "alias": "challenger",
    "reason": "student pass@1 0.490 < 1.00 x teacher 0.500",
    "model_uri": "models:/moeforge-student@challenger",
    "student_pass_at_1": 0.49,
    "teacher_pass_at_1": 0.5,
    "champion_pass_at_1": 0.52,
    "exports": {"hf": "hf", "gguf": "gguf/student-f16.gguf"},
}


def test_register_and_serve_results_read_typed_and_write_back_the_same_files(tmp_path):
    (tmp_path / "registration.json").write_text(json.dumps(REGISTRATION))
    registration = read_result(tmp_path, Registration)
    assert registration.version == 3 and registration.exports == Exports(hf="hf", gguf="gguf/student-f16.gguf")
    write_result(tmp_path / "again", registration)
    assert json.loads((tmp_path / "again" / "registration.json").read_text()) == REGISTRATION
    # an exact-layout student: no formats, the reason instead; a first version: no champion to compare with
    skipped = Exports(skipped="the exact layout: set convert.layout: standard")
    write_result(tmp_path, skipped)
    assert json.loads((tmp_path / "exports.json").read_text()) == {"skipped": skipped.skipped}
    assert read_result(tmp_path, Exports) == skipped
    first = registration.model_copy(update={"champion_pass_at_1": None, "exports": skipped})
    write_result(tmp_path, first)
    assert read_result(tmp_path, Registration) == first
    endpoint = Endpoint(
        url="http://127.0.0.1:8000",
        openai_base_url="http://127.0.0.1:8000/v1",
        model="moeforge-student",
        model_uri="models:/moeforge-student@champion",
        pinned_uri="models:/moeforge-student/3",
        version="3",
        alias="champion",
    )
    for served in (endpoint, endpoint.model_copy(update={"version": None, "alias": None})):  # a model by path
        write_result(tmp_path, served)
        assert read_result(tmp_path, Endpoint) == served


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"version": "three"}, "version"),
        ({"alias": "best"}, "alias"),
        ({"exports": {"onnx": "model.onnx"}}, "exports.onnx"),
        ({"reason": None}, "reason"),
    ],
)
def test_a_broken_registration_is_an_error_naming_what_is_wrong(tmp_path, change, named):
    (tmp_path / "registration.json").write_text(json.dumps({**REGISTRATION, **change}))
    with pytest.raises(ValidationError, match=named):
        read_result(tmp_path, Registration)
