"""Stages `train`, `evaluate` and `register` for real: a driver killed mid-training, rerun, resumes from the Ray Train
checkpoint (not step 0), then evaluates against the teacher and registers a model that loads by alias in a fresh
process and generates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.stages.results import EvaluationSummary, Exports, Registration, read_result, read_summary
from pipeline.student.registry import gate
from tests.actors.test_trainer import registered_checkpoint
from tests.pipeline.stages.conftest import TEACHER_SAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

OVERRIDES = [
    *TEACHER_SAMPLES,  # generate and distill come from the `upstream` fixture (conftest.py)
    "model.init=scratch",
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.inter_dim=128",
    "model.moe_inter_dim=32",
    "model.n_routed_experts=8",
    "model.n_activated_experts=2",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "train.num_workers=2",
    "train.cpus_per_worker=1",
    "train.max_steps=40",
    "train.warmup_steps=2",
    "train.checkpoint_every=5",
    "train.batch_size=2",
    "train.seq_len=64",
    "refine.iterations=0",  # off: evaluate and register judge the trained student (refine: test_refine.py)
    "evaluate.max_new_tokens=24",
    "evaluate.partition_size=2",
    "evaluate.decode_tokens=0",  # decode speed has its own test (test_evaluate_register.py)
    "registry.model_name=test-student",
]

DRIVER = """
import sys
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.student.registry import gate
run_pipeline(load_config(sys.argv[1], sys.argv[2:]))
"""

LOAD = """
import sys, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
out = mlflow.pyfunc.load_model(sys.argv[2]).predict(pd.DataFrame({"prompt": ["What is 2 + 2?"]}),
                                                    params={"max_new_tokens": 8})
print(repr(out))
"""


def test_a_student_that_does_not_fit_the_tokenizer_fails_clearly(upstream):
    from pipeline.runner import StageFailed

    cfg = load_config("tiny", [f"tracking.workdir={upstream}", *OVERRIDES, "model.vocab_size=1000"])
    with pytest.raises(StageFailed, match=r"model.vocab_size is 1000 but the paired tokenizer has 49152 tokens"):
        run_pipeline(cfg, until="train")


@pytest.mark.timeout(900)
def test_driver_killed_mid_training_resumes_from_the_checkpoint_then_evaluates_and_registers(upstream):
    import ray

    workdir = upstream
    overrides = [f"tracking.workdir={workdir}", *OVERRIDES]
    cfg = load_config("tiny", overrides)

    # a driver process on the same cluster runs the pipeline (generate, distill cached) and is killed mid-training
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "tiny", *overrides],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 400
    run_dir = None
    while time.monotonic() < deadline and driver.poll() is None:
        runs = list((workdir / "checkpoints").glob("train-*"))
        if runs and registered_checkpoint(runs[0]):
            run_dir = runs[0]
            break
        time.sleep(0.2)
    assert run_dir is not None, f"no training checkpoint appeared (driver exit code {driver.poll()})"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed_at = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    assert killed_at["latest_checkpoint_result"]["metrics"]["step"] < 40  # it really was mid-training
    time.sleep(3)  # the dead driver's tasks and actors are reclaimed

    result = run_pipeline(cfg)
    assert [s.name for s in result.stages] == ["generate", "distill", "convert", "train", "evaluate", "register"]
    assert [s.cache_hit for s in result.stages] == [True, True, True, False, False, False]
    client = MlflowClient(result.tracking_uri)
    train = result["train"].run_id
    resumed = [m.value for m in client.get_metric_history(train, "resumed_from_step")]
    assert resumed and resumed[0] >= 5  # the rerun began at a checkpoint …
    steps = [m.step for m in client.get_metric_history(train, "loss")]
    assert min(steps) > 5 and max(steps) == 40  # … so its first reported step is past zero, its last the plan

    # the evaluation as summary.json and as the run's metrics and tags: the same summary, read through its type
    summary = read_summary(Path(result["evaluate"].outputs["eval_report"].uri.removeprefix("file://")))
    evaluated = client.get_run(result["evaluate"].run_id).data
    assert EvaluationSummary.from_metrics(evaluated.metrics, evaluated.tags) == summary
    # one progress bar for the stage, over the three models' answers to the 4 held-out prompts
    assert evaluated.metrics["progress.done"] == evaluated.metrics["progress.total"] == 3 * 4
    for model in summary.models().values():
        assert 0 <= model.pass_at_1 <= 1 and "basic_arithmetic" in model.pass_at_1_by_task
    assert summary.teacher.mean_completion_tokens > 0 and summary.floor is not None
    assert summary.economics.costs is None and not summary.economics.decode_tokens_per_s  # scratch, not measured

    registration = read_result(
        Path(result["register"].outputs["registration"].uri.removeprefix("file://")), Registration
    )
    alias = registration.alias
    version = client.get_model_version_by_alias("test-student", alias)
    assert version.run_id == train and version.tags["moeforge.alias"] == alias
    assert version.tags["moeforge.gate_reason"] == registration.reason
    # the registered student exported for the engines (a scratch student is in DeepSeek-V3's standard layout)
    assert registration.exports == Exports(hf="hf", gguf="gguf/student-f32.gguf")
    exports = Path(result["register"].outputs["exports"].uri.removeprefix("file://"))
    assert read_result(exports, Exports) == registration.exports
    assert (exports / "hf" / "model.safetensors").is_file() and (exports / "gguf" / "student-f32.gguf").is_file()
    assert version.tags["moeforge.exports"] == f"runs:/{result['register'].run_id}/outputs/exports"
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, result.tracking_uri, f"models:/test-student@{alias}"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = eval(proc.stdout.strip().splitlines()[-1])  # the repr printed by our own child process
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)

    student, teacher = summary.student.pass_at_1, summary.teacher.pass_at_1
    by_task, floor = summary.student.pass_at_1_by_task, summary.floor.pass_at_1_by_task
    assert (alias, registration.reason) == gate(student, teacher, None, 1.0, True, by_task, floor)

    # only the gate changed: register re-runs on the same registry version (no new one), nothing upstream does
    again = run_pipeline(load_config("tiny", [*overrides, "registry.gate_ratio=100"]))
    assert [s.cache_hit for s in again.stages] == [True, True, True, True, True, False]
    alias, reason = gate(student, teacher, None, 100, True, by_task, floor)
    assert client.get_model_version_by_alias("test-student", alias).version == version.version
    assert client.get_model_version("test-student", version.version).tags["moeforge.gate_reason"] == reason
    assert len(client.search_model_versions("name = 'test-student'")) == 1
