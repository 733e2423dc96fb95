"""`moeforge submit` without a cluster: entrypoints, runtime environments, and the errors a user can cause.
(Submitting to a real cluster: tests/jobs/test_cluster.py.)"""

from __future__ import annotations

import shlex

import pytest
from typer.testing import CliRunner

from pipeline import submit as sub
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.version import code_version
from tests.conftest import REPO, free_port


def test_entrypoint_runs_a_jobs_module_with_the_config_and_overrides():
    cmd = sub.entrypoint(
        "train", "tiny", ["train.max_steps=5", "data.tasks=[{name: 'chain_sum'}]"], ["--force", "train"]
    )
    assert shlex.split(cmd) == [
        "python",
        "-m",
        "jobs.train",
        "--config",
        "tiny",
        "--set",
        "train.max_steps=5",
        "--set",
        "data.tasks=[{name: 'chain_sum'}]",
        "--force",
        "train",
    ]
    with_job = sub.entrypoint("pipeline", "tiny", ["job.env_vars={HF_TOKEN: sk-secret}", "train.max_steps=5"], [])
    assert "sk-secret" not in with_job and "train.max_steps=5" in with_job  # the job gets job.* as its runtime env
    for leaky in ("tracking.uri=http://bob:pw@mlflow:5000", "teacher.base_url=https://k:s@api.example/v1"):
        with pytest.raises(sub.SubmitError, match="holds a credential"):
            sub.entrypoint("pipeline", "tiny", [leaky], [])
    # the names `moeforge submit` accepts are exactly the modules of jobs/, and its --help lists every one
    assert set(sub.JOB_NAMES) == {p.stem for p in (REPO / "jobs").glob("*.py")} - {"__init__"}
    shown = " ".join(CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "400"}).output.split())
    assert all(job in shown for job in sub.JOB_NAMES), shown
    with pytest.raises(sub.SubmitError, match="unknown job 'trian'; jobs: pipeline, generate"):
        sub.entrypoint("trian", "tiny", [], [])


def test_config_files_are_named_inside_the_uploaded_working_dir(tmp_path):
    assert sub.config_argument("tiny", REPO) == "tiny"  # presets resolve in the job's own configs/
    assert sub.config_argument(str(REPO / "configs" / "cluster.yaml"), REPO) == "configs/cluster.yaml"
    outside = tmp_path / "mine.yaml"
    outside.write_text("name: mine\n")
    with pytest.raises(sub.SubmitError, match="outside the job's working dir"):
        sub.config_argument(str(outside), REPO)


def test_runtime_env_from_the_job_section_and_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("SECRET_NOT_FORWARDED", "x")
    cfg = load_config("tiny", ["job.pip=[rich]", "job.env_vars={HF_HUB_OFFLINE: '1'}", "job.working_dir=."])
    env = sub.runtime_env(cfg)
    assert env["env_vars"] == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "HF_HUB_OFFLINE": "1",
        "MOEFORGE_CODE_VERSION": code_version(),  # of the working dir's code: this repo's
        **(
            {"MOEFORGE_CACHE_DIR": env["env_vars"]["MOEFORGE_CACHE_DIR"]}
            if "MOEFORGE_CACHE_DIR" in env["env_vars"]
            else {}
        ),
    }
    assert env["pip"] == ["rich"] and ".venv" in env["excludes"] and env["working_dir"].startswith("/")
    assert sub.tracking_uri_of_job(cfg) == "http://mlflow:5000"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert sub.job_address(cfg.job) == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not the job server
    assert sub.job_address(cfg.job) == sub.DEFAULT_ADDRESS


def test_submit_to_a_cluster_that_is_not_there_says_so(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["submit", "pipeline", "--address", address, "--no-wait"])
    assert result.exit_code == 2
    assert f"cannot reach the Ray job server at {address}" in result.output
    result = CliRunner().invoke(app, ["jobs", "--address", address])
    assert result.exit_code == 2 and "cannot reach the Ray job server" in result.output
    result = CliRunner().invoke(app, ["submit", "--set", "train.max_steps=0"])
    assert result.exit_code == 2 and "train.max_steps" in result.output
