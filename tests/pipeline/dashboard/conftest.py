"""A real MLflow store (SQLite) with pipeline runs logged the way the runner and the stages log them."""

from __future__ import annotations

import pytest

from pipeline.config import MoeforgeConfig
from pipeline.runner import default_stages
from pipeline.stages.results import (
    ConversionReport,
    DecodeSpeed,
    Economics,
    EvaluationSummary,
    Fidelity,
    Floor,
    ModelResult,
    SummaryEconomics,
)
from pipeline.tracking import Tracker


def start_stage(tracker, cfg, parent, stage, key):
    return tracker.start_stage(parent, stage, key, cfg.slice(stage.config_sections), {}, "test")


@pytest.fixture
def tracked(tmp_path):
    cfg = MoeforgeConfig.model_validate({"tracking": {"workdir": str(tmp_path)}})
    tracker = Tracker(cfg.tracking)
    stages = {s.name: s for s in default_stages()}
    return cfg, tracker, stages


def model_result(overall: float, chain_sum: float, letter_counting: float, tokens: float) -> ModelResult:
    return ModelResult(
        pass_at_1=overall,
        pass_at_1_by_task={"chain_sum": chain_sum, "letter_counting": letter_counting},
        mean_completion_tokens=tokens,
        format_failure_rate=0.125,
        truncated_rate=0.0,
        prompts=8,
    )


CONVERSION = ConversionReport(
    init="teacher",
    teacher="HuggingFaceTB/SmolLM2-135M-Instruct",
    layers=[0, 1],
    rope_pairs=[[[0, 1]], [[0, 1]]],
    block_importance=[0.5, 0.25],
    calibration_samples=4,
    held_out_samples=2,
    fidelity=Fidelity(
        kl_to_teacher=0.4123, student_ppl=6.0, teacher_ppl=4.0, held_out_tokens=100, calibration_tokens=400
    ),
    economics=Economics(
        student_params_total=301_989_888,
        student_params_active=120_000_000,
        student_params_active_nonembedding=42_480_000,
        student_params_embedding=77_520_000,
        teacher_params_total=134_515_008,
        teacher_params_nonembedding=106_200_000,
        teacher_params_embedding=28_315_008,
        active_param_ratio=0.4,
        student_cache_floats_per_token=8640,
        teacher_cache_floats_per_token=11520,
        cache_ratio=0.75,
    ),
)
# what a finished evaluate stage logs: every model on two tasks, the floor with its answers, costs and speeds
SUMMARY = EvaluationSummary(
    teacher=model_result(0.25, 0.125, 0.375, 48.5),
    teacher_best=model_result(0.5, 0.25, 0.75, 52.0),
    student=model_result(0.375, 0.25, 0.5, 12.3),
    floor=Floor(
        pass_at_1=0.5,
        pass_at_1_by_task={"chain_sum": 0.25, "letter_counting": 0.75},
        answer_by_task={"chain_sum": "12", "letter_counting": "1"},
    ),
    economics=SummaryEconomics.of(
        CONVERSION, {1: DecodeSpeed(student=31.5, teacher=40.3), 16: DecodeSpeed(student=310.0, teacher=290.5)}
    ),
)


def log_evaluation(tracker, run_id: str, summary: EvaluationSummary = SUMMARY) -> None:
    """What stage evaluate logs of its summary: the metrics and the tags."""
    from mlflow.entities import Metric, RunTag

    tracker.client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in summary.to_metrics().items()],
        tags=[RunTag(k, v) for k, v in summary.to_tags().items()],
    )
