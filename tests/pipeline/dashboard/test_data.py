"""The dashboard's view of a run, built from a real MLflow store (SQLite) and Prometheus text as Ray exports it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from pipeline.dag import Dag
from pipeline.dashboard.app import create_app
from pipeline.dashboard.data import RayView, RunData, histogram_summary
from pipeline.runner import default_stages
from tests.pipeline.dashboard.conftest import SUMMARY, log_evaluation, start_stage

# what a node's metrics agent serves for two processes' serving histograms (trimmed to the labels that matter)
PROMETHEUS = """\
# HELP ray_moeforge_serve_latency_seconds Generation time of a request, submit to last token
# TYPE ray_moeforge_serve_latency_seconds histogram
ray_moeforge_serve_latency_seconds_bucket{WorkerId="a",le="0.5",route="/v1/completions"} 1.0
ray_moeforge_serve_latency_seconds_bucket{WorkerId="a",le="1.0",route="/v1/completions"} 3.0
ray_moeforge_serve_latency_seconds_bucket{WorkerId="a",le="+Inf",route="/v1/completions"} 3.0
ray_moeforge_serve_latency_seconds_sum{WorkerId="a",route="/v1/completions"} 2.1
ray_moeforge_serve_latency_seconds_count{WorkerId="a",route="/v1/completions"} 3.0
ray_moeforge_serve_latency_seconds_bucket{WorkerId="b",le="0.5",route="/v1/completions"} 0.0
ray_moeforge_serve_latency_seconds_bucket{WorkerId="b",le="1.0",route="/v1/completions"} 0.0
ray_moeforge_serve_latency_seconds_bucket{WorkerId="b",le="+Inf",route="/v1/completions"} 1.0
ray_moeforge_serve_latency_seconds_sum{WorkerId="b",route="/v1/completions"} 4.0
ray_moeforge_serve_latency_seconds_count{WorkerId="b",route="/v1/completions"} 1.0
"""


def test_histogram_summary_sums_processes_and_reads_quantiles_from_buckets():
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(PROMETHEUS))
    (route,) = histogram_summary(families, "ray_moeforge_serve_latency_seconds").items()
    name, s = route
    assert name == "/v1/completions" and s["count"] == 4 and s["mean_s"] == pytest.approx(6.1 / 4)
    assert s["p50_s"] == 1.0  # 3 of 4 requests within 1 s
    assert s["p95_s"] is None  # beyond the largest finite bucket: unknown, not infinity


def test_a_run_in_progress_shows_states_progress_and_what_is_known_so_far(tracked):
    from mlflow.entities import Metric

    cfg, tracker, stages = tracked
    parent = tracker.start_pipeline(cfg, "test", ["generate", "distill", "train", "evaluate", "register"])
    gen = start_stage(tracker, cfg, parent, stages["generate"], "k-gen")
    tracker.client.log_batch(
        gen,
        metrics=[
            Metric(k, v, 0, 0)
            for k, v in {
                "acceptance_rate": 0.75,
                "acceptance_rate.chain_sum": 0.5,
                "acceptance_rate.letter_counting": 1.0,
                "samples": 8,
                "accepted": 6,
                "tokens_per_s": 12.5,
            }.items()
        ],
    )
    tracker.finish_stage(gen, {})
    distill = start_stage(tracker, cfg, parent, stages["distill"], "k-distill")
    tracker.client.log_batch(distill, metrics=[Metric("progress.done", 3, 0, 0), Metric("progress.total", 8, 0, 0)])

    data = RunData(tracker, RayView(None), Dag(default_stages()))
    view = data.run(parent)
    assert view["run"]["state"] == "running"
    states = {s["name"]: s["state"] for s in view["stages"]}
    assert states == {
        "generate": "finished",
        "distill": "running",
        "train": "pending",
        "evaluate": "pending",
        "register": "pending",
    }
    assert view["stages"][0]["key_metrics"] == {"acceptance_rate": 0.75, "samples": 8, "tokens_per_s": 12.5}
    assert view["stages"][1]["progress"] == {"done": 3, "total": 8, "unit": "items"}
    assert view["acceptance"]["by_task"] == {"chain_sum": 0.5, "letter_counting": 1.0}
    assert ["generate", "distill"] in view["edges"] and ["train", "evaluate"] in view["edges"]
    assert "loss" not in view and "evaluation" not in view

    # the stage fails: the run shows it with its error, the rest never ran
    tracker.fail(distill, "RuntimeError: teacher died")
    tracker.fail(parent, "stage 'distill' failed")
    view = data.run(parent)
    states = {s["name"]: s["state"] for s in view["stages"]}
    assert states["distill"] == "failed" and states["train"] == "not run"
    assert view["stages"][1]["error"] == "RuntimeError: teacher died" and view["run"]["error"]


def test_a_cached_stage_shows_the_numbers_of_the_run_it_reused(tracked):
    from mlflow.entities import Metric

    from pipeline.tracking import CachedStage

    cfg, tracker, stages = tracked
    first = tracker.start_pipeline(cfg, "test", ["train", "evaluate"])
    train = start_stage(tracker, cfg, first, stages["train"], "k-train")
    losses = [Metric("loss", v, 0, step) for step, v in ((1, 9.0), (2, 7.5), (3, 6.0))]
    losses += [Metric("val_loss", v, 0, step) for step, v in ((0, 9.5), (3, 8.0))]
    shares = [Metric(f"expert_share.l{layer}.e{e}", 0.25, 0, 3) for layer in (1, 2) for e in range(4)]
    tracker.client.log_batch(train, metrics=losses + shares)
    tracker.finish_stage(train, {})
    evaluate = start_stage(tracker, cfg, first, stages["evaluate"], "k-eval")
    log_evaluation(tracker, evaluate)
    tracker.finish_stage(evaluate, {})
    tracker.finish(first)

    second = tracker.start_pipeline(cfg, "test", ["train", "evaluate"])
    for name, source in (("train", train), ("evaluate", evaluate)):
        hit = start_stage(tracker, cfg, second, stages[name], f"k-{name}")
        tracker.record_cache_hit(hit, CachedStage(source, {}))
    tracker.finish(second)

    client = TestClient(create_app(RunData(tracker, RayView(None), Dag(default_stages()))))
    view = client.get(f"/api/runs/{second}").json()
    assert [s["cache_hit"] for s in view["stages"]] == [True, True]
    assert view["stages"][0]["cached_from"] == train
    assert view["loss"]["loss"] == [[1, 9.0], [2, 7.5], [3, 6.0]]
    assert view["loss"]["val_loss"] == [[0, 9.5], [3, 8.0]]  # drawn beside the training loss
    assert view["expert_load"] == {"layers": [1, 2], "experts": [0, 1, 2, 3], "share": [[0.25] * 4, [0.25] * 4]}
    # the evaluation, as `moeforge run` prints it: every model and the floor (with its answer) per task and overall,
    # the answers' statistics, the student's costs beside the teacher's and the decode speeds
    evaluation = view["evaluation"]
    assert evaluation["models"] == [
        {"name": "teacher", "label": "teacher"},
        {"name": "teacher_best", "label": "teacher, worked examples"},
        {"name": "student", "label": "student"},
    ]
    assert evaluation["rows"] == [
        {
            "task": "chain_sum",
            "teacher": 0.125,
            "teacher_best": 0.25,
            "student": 0.25,
            "floor": 0.25,
            "floor_answer": "12",
        },
        {
            "task": "letter_counting",
            "teacher": 0.375,
            "teacher_best": 0.75,
            "student": 0.5,
            "floor": 0.75,
            "floor_answer": "1",
        },
        {"task": "overall", "teacher": 0.25, "teacher_best": 0.5, "student": 0.375, "floor": 0.5, "floor_answer": None},
    ]
    assert evaluation["mean_completion_tokens"] == {"teacher": 48.5, "teacher_best": 52.0, "student": 12.3}
    assert evaluation["format_failure_rate"]["student"] == 0.125
    costs = evaluation["costs"]
    assert (
        costs["student_params_active_nonembedding"] == 42_480_000
        and costs["teacher_params_nonembedding"] == 106_200_000
    )
    assert (costs["active_param_ratio"], costs["cache_ratio"], costs["kl_to_teacher"]) == (0.4, 0.75, 0.4123)
    assert costs["student_cache_floats_per_token"] == 8640 and costs["teacher_cache_floats_per_token"] == 11520
    assert evaluation["decode"] == [
        {"batch": 1, "student": 31.5, "teacher": 40.3},
        {"batch": 16, "student": 310.0, "teacher": 290.5},
    ]
    # `moeforge status` prints the same summary, read back typed from the run that did the work
    assert RunData(tracker, RayView(None), Dag(default_stages())).evaluation(second) == SUMMARY
    assert client.get("/api/runs/latest").json()["run"]["run_id"] == second
    assert [r["run_id"] for r in client.get("/api/runs").json()["runs"]] == [second, first]
    # bad input: an unknown run, a stage run where a pipeline run is expected
    assert client.get("/api/runs/nope").status_code == 404
    assert "not a pipeline run" in client.get(f"/api/runs/{train}").json()["detail"]
    page = client.get("/")
    assert page.status_code == 200 and "dashboard.js" in page.text
    assert client.get("/static/dashboard.js").status_code == 200


def test_refine_draws_reward_and_reverse_kl_per_iteration(tracked):
    from mlflow.entities import Metric

    cfg, tracker, stages = tracked
    parent = tracker.start_pipeline(cfg, "test", ["refine"])
    refine = start_stage(tracker, cfg, parent, stages["refine"], "k-refine")
    view = RunData(tracker, RayView(None), Dag(default_stages())).run(parent)
    assert view["refine"] == {}  # running, no iteration finished: the chart says so
    figures = [Metric("reward", v, 0, i) for i, v in enumerate((0.25, 0.5))]
    figures += [Metric("reverse_kl", v, 0, i) for i, v in enumerate((0.9, 0.6))]
    tracker.client.log_batch(refine, metrics=figures)
    view = RunData(tracker, RayView(None), Dag(default_stages())).run(parent)
    assert view["refine"] == {"reward": [[0, 0.25], [1, 0.5]], "reverse_kl": [[0, 0.9], [1, 0.6]]}
    assert [s["name"] for s in view["stages"]] == ["refine"]
