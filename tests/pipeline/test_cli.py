"""The `moeforge` CLI, run in-process with typer's runner against real stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from ray import serve
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.tracking import P, Tracker
from tests.conftest import REPO, free_port
from tests.pipeline.stages_for_tests import chain


@pytest.fixture
def cli(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_config_show_resolves_overrides(cli):
    res = cli("config", "show", "--config", "gpu-small", "--set", "train.max_steps=700")
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(res.stdout)
    assert data["name"] == "gpu-small" and data["train"]["max_steps"] == 700 and data["train"]["use_gpu"] is True


def test_bad_config_exits_2_naming_the_key(cli):
    res = cli("config", "show", "--set", "model.n_activated_experts=99")
    assert res.exit_code == 2
    assert "model.n_activated_experts: n_activated_experts (99) must be <= n_routed_experts (20)" in res.output
    res = cli("run", "--config", "tiny", "--set", "train.max_stepz=1")
    assert res.exit_code == 2 and "train.max_stepz: unknown key" in res.output


def test_stages_lists_the_product_dag(cli):
    res = cli("stages")
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if " generate " in ln)
    assert "samples (dataset), eval_prompts (dataset)" in line and "teacher, data, generate" in line


# the README's command at a tenth of the work (the full-size run is benchmarks/pipeline_tiny.py); refine stays off
# as in the default (a pipeline through refine: tests/pipeline/stages/test_refine.py and tests/jobs/test_cluster.py)
SMALLER = [
    "data.num_train_prompts=12",
    "data.num_eval_prompts=4",
    "teacher.max_new_tokens=48",
    "train.max_steps=4",
    "train.warmup_steps=2",
    "train.batch_size=2",
    "evaluate.max_new_tokens=32",
    "evaluate.decode_tokens=8",
    "evaluate.decode_batches=[1]",
]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.timeout(900)
def test_run_tiny_twice_on_the_embedded_default(cli, tmp_path):
    """The README's main command, on the real default teacher, every stage; the second run is all cache hits."""
    sets = [a for s in SMALLER for a in ("--set", s)]
    for i in range(2):
        res = cli("run", "--config", "tiny", *sets)
        assert res.exit_code == 0, res.output
        assert ("generate   cached" if i else "generate   done") in res.output
        assert "refine     off (trained_student as student)" in res.output
        assert "register   " + ("cached" if i else "done") in res.output
        assert "held-out pass@1" in res.output and "overall" in res.output  # the evaluation table it prints
        assert "constant-answer floor" in res.output and "teacher, worked examples" in res.output
        assert res.output.count("held-out pass@1") == 1  # printed once
        assert "registered moeforge-student version 1 as" in res.output
        # the default student is DeepSeek-V3's layout: register exported it, and the run says where
        exported = next(ln for ln in res.output.splitlines() if ln.startswith("exported for other engines: "))
        hf, gguf = (part.split(" (")[0] for part in exported.removeprefix("exported for other engines: ").split("; "))
        assert (Path(hf) / "config.json").is_file() and Path(gguf).name == "student-f32.gguf" and Path(gguf).is_file()
        said = " ".join(res.output.split())  # the closing line says how to serve what was registered, same settings
        assert "next: `moeforge serve --model models:/moeforge-student/1 --set" in said, said[-600:]
        assert "`moeforge dashboard --set" in said
    assert (tmp_path / ".moeforge" / "mlflow.db").is_file()
    tracker = Tracker(load_config("tiny").tracking)
    runs = tracker.pipeline_runs()
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    res = cli("status")
    assert res.exit_code == 0 and runs[0].info.run_id in res.output and "FINISHED" in res.output
    for stage in ("generate", "distill", "convert", "train", "evaluate", "register"):
        assert stage in res.output
    # and the evaluation the run printed, read back from the evaluate run it reused
    assert "held-out pass@1" in res.output and "teacher, worked examples" in res.output
    assert "student cost vs teacher" in res.output and "decode tokens/s" in res.output
    # the student was converted from the teacher, and how far it was from it before training is on record
    from pipeline.stages.results import Economics, Fidelity

    convert = next(r for r in tracker.stage_runs(runs[-1].info.run_id) if r.info.run_name == "convert")
    fidelity, costs = Fidelity.from_metrics(convert.data.metrics), Economics.from_metrics(convert.data.metrics)
    assert fidelity is not None and 0 < fidelity.kl_to_teacher < float("inf") and fidelity.student_ppl >= 1
    # DeepSeek-V3's layout: per layer the 192-wide latent and one 32-wide rope key, against the teacher's keys and
    # values of 3 KV heads x 64
    assert costs is not None and costs.cache_ratio == pytest.approx((192 + 32) / (2 * 3 * 64))
    # the quality benchmark reads this run's evaluation and conversion and ends with its RESULT line
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "student_quality.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT student_pass_at_1=") and "floor=" in last and "cache_ratio=0.583" in last

    # the optional last stage: a challenger-only registry has no champion to serve, and says what to do instead
    port = free_port()
    serve_sets = [
        *sets,
        "--set",
        "serve.enabled=true",
        "--set",
        f"serve.port={port}",
        "--set",
        "serve.num_cpus=1",
        "--set",
        "registry.gate_ratio=100",
    ]
    res = cli("run", "--config", "tiny", *serve_sets)
    aliases = tracker.client.get_model_version("moeforge-student", "1").aliases
    if "champion" not in aliases:  # gate_ratio 100 is out of reach unless the teacher solved nothing
        assert res.exit_code == 1 and "nothing to serve" in res.output
        assert "serve.model_uri=models:/moeforge-student@challenger" in res.output
        res = cli("run", "--config", "tiny", *serve_sets, "--set", "serve.model_uri=models:/moeforge-student/1")
    assert res.exit_code == 0, res.output
    assert "serve      done" in res.output and f"at http://127.0.0.1:{port}/v1" in res.output
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        (card,) = client.models.list().data
        assert card.id == "moeforge-student" and card.model_extra["moeforge"]["version"] == "1"
        answer = client.chat.completions.create(
            model="moeforge-student", max_tokens=8, messages=[{"role": "user", "content": "What is 2 + 2?"}]
        )
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1
    finally:
        serve.shutdown()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_status_shows_each_stage_with_cache_hits(cli, tmp_path):
    cfg = load_config("tiny", [f"tracking.workdir={tmp_path / 'w'}", "data.num_train_prompts=5"])
    run_pipeline(cfg, chain())
    second = run_pipeline(cfg, chain())
    res = cli("status", "--set", f"tracking.workdir={tmp_path / 'w'}")
    assert res.exit_code == 0, res.output
    assert second.run_id in res.output
    for name in ("numbers", "scale", "summarize"):
        line = next(ln for ln in res.output.splitlines() if f" {name} " in ln)
        assert "finished" in line and "hit ←" in line
    assert "rows=5" in res.output  # key metrics come from the run that produced the cached outputs
    res = cli("status", second.run_id, "--set", f"tracking.workdir={tmp_path / 'w'}")
    assert res.exit_code == 0 and res.output.count("hit ←") == 3
    tags = Tracker(cfg.tracking).stage_runs(second.run_id)[0].data.tags
    assert tags[P + "cache_hit"] == "true"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_status_of_unknown_or_non_pipeline_run_is_a_clear_error(cli, tmp_path):
    assert (
        cli(
            "run",
            "--until",
            "generate",
            "--set",
            f"tracking.workdir={tmp_path / 'w'}",
            "--set",
            "data.num_train_prompts=2",
            "--set",
            "teacher.max_new_tokens=8",
        ).exit_code
        == 0
    )
    res = cli("status", "0123456789abcdef", "--set", f"tracking.workdir={tmp_path / 'w'}")
    assert res.exit_code == 1 and "no run '0123456789abcdef'" in res.output


@pytest.mark.slow  # a server in a subprocess
def test_ui_serves_the_mlflow_ui_on_loopback(tmp_path):
    """`moeforge ui` starts a real MLflow UI on 127.0.0.1 for the configured store."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import free_port, wait_http

    port = free_port()
    moeforge = str(Path(sys.executable).parent / "moeforge")
    proc = subprocess.Popen(
        [moeforge, "ui", "--port", str(port), "--set", f"tracking.workdir={tmp_path / 'w'}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        import httpx

        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert f"MLflow UI: http://127.0.0.1:{port}" in out and "Ray dashboard:" in out


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_serve_deploys_the_model_it_is_given_and_names_a_bad_one(cli, registered_student):
    s = registered_student
    res = cli("serve", "--model", f"models:/{s.name}@nope", "--set", f"tracking.uri={s.tracking_uri}")
    assert res.exit_code == 2 and "has no alias 'nope'" in res.output
    port = free_port()
    res = cli(
        "serve",
        "--model",
        str(s.directory),
        "--port",
        str(port),
        "--replicas",
        "1",
        "--set",
        "serve.num_cpus=1",
        "--detach",
    )
    try:
        assert res.exit_code == 0, res.output
        assert f"at http://127.0.0.1:{port}/v1" in res.output
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            timeout=60,
            json={"model": "student", "prompt": "Hi", "max_tokens": 3, "ignore_eos": True},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        # Serve's port is fixed while it runs: asking for another one says so and names where it really is
        again = cli(
            "serve",
            "--model",
            str(s.directory),
            "--port",
            str(free_port()),
            "--replicas",
            "1",
            "--set",
            "serve.num_cpus=1",
            "--detach",
        )
        assert again.exit_code == 0 and f"Serve already runs on this cluster at http://127.0.0.1:{port}" in again.output
    finally:
        serve.shutdown()


def test_serve_on_a_public_host_without_a_key_refuses_to_start_naming_the_setting(cli, monkeypatch):
    import ray

    monkeypatch.delenv("MOEFORGE_API_KEY", raising=False)
    started = ray.is_initialized()
    res = cli("serve", "--host", "0.0.0.0", "--model", "models:/anything@champion")
    assert res.exit_code == 2, res.output
    assert "serve.api_key_file" in res.output and "serve.allow_unauthenticated=true" in res.output
    assert ray.is_initialized() == started  # refused before any cluster was started or joined


def test_serve_with_only_a_challenger_names_it_and_the_model_to_serve(cli, registered_student, tmp_path):
    """What the default run leaves when its student misses the gate: a version with alias challenger, no champion.
    `moeforge serve` (default: the champion) refuses before starting a cluster and says what would serve."""
    from mlflow import MlflowClient

    from pipeline.student.registry import log_student

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("gate", artifact_location=str(tmp_path / "artifacts")))
    version = log_student(registered_student.directory, run.info.run_id, uri, "moeforge-student")
    client.set_registered_model_alias("moeforge-student", "challenger", version.version)
    res = cli("serve", "--set", f"tracking.uri={uri}")
    assert res.exit_code == 2, res.output
    said = " ".join(res.output.split())
    assert "has no alias 'champion'" in said and "challenger -> version 1" in said, said
    assert "--model models:/moeforge-student@challenger" in said, said
    res = cli("serve", "--model", "models:/no-such-model@champion", "--set", f"tracking.uri={uri}")
    assert res.exit_code == 2 and "no registered model 'no-such-model'" in " ".join(res.output.split()), res.output
