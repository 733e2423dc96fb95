"""Secrets planted in a config (job.env_vars, credentials in the tracking URL and the teacher's URL) appear nowhere
a run shows or records: MLflow params, tags and artifacts, `config show`, the dashboard's JSON, the CLI's output."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.redaction import REDACTED, redact, redact_uri, redact_url, secret_name

SECRETS = ("sk-planted-env-0451", "planted-mlflow-pw-77", "planted-teacher-pw-99")


@pytest.mark.parametrize(
    "name, secret",
    [
        ("HF_TOKEN", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("db_password", True),
        ("api_key", True),
        ("OPENAI_API_KEY", True),
        ("auth", True),
        ("MLFLOW_TRACKING_PASSWORD", True),
        ("access-key", True),
        ("api_key_env", False),
        ("api_key_file", False),
        ("max_tokens", False),
        ("tokenizer", False),
        ("max_new_tokens", False),
        ("keep_running", False),
        ("allow_unauthenticated", False),
        ("model", False),
    ],
)
def test_secret_names(name, secret):
    assert secret_name(name) is secret


def test_urls_lose_their_credentials_and_nothing_else():
    assert redact_url("http://bob:pw@mlflow:5000/x?y=1") == f"http://{REDACTED}@mlflow:5000/x?y=1"
    assert redact_url("see s3://KEY:SECRET@bucket/a and https://h/b") == f"see s3://{REDACTED}@bucket/a and https://h/b"
    assert redact_url("user@example.com, git@github.com:x") == "user@example.com, git@github.com:x"  # no scheme
    assert redact_uri("https://bob:pw@mlflow.example:443/") == "https://mlflow.example:443/"
    assert redact_uri("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"


def test_redact_hides_env_values_secret_fields_and_url_credentials_only():
    cfg = {
        "job": {"env_vars": {"HF_HUB_OFFLINE": "1", "X": "sk-1"}, "pip": ["rich"]},
        "teacher": {"api_key_env": "OPENAI_API_KEY", "base_url": "http://u:p@host/v1", "max_new_tokens": 8},
        "custom": {"db_password": "hunter2", "token_count": 3, "tokens": ["a"]},
    }
    assert redact(cfg) == {
        "job": {"env_vars": {"HF_HUB_OFFLINE": REDACTED, "X": REDACTED}, "pip": ["rich"]},
        "teacher": {"api_key_env": "OPENAI_API_KEY", "base_url": f"http://{REDACTED}@host/v1", "max_new_tokens": 8},
        "custom": {"db_password": REDACTED, "token_count": 3, "tokens": ["a"]},
    }


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_planted_secret_appears_nowhere_a_run_shows(tmp_path, mlflow_server, monkeypatch, capfd):
    from pipeline.cli import app
    from pipeline.config import load_config
    from pipeline.dag import Dag
    from pipeline.dashboard.app import create_app
    from pipeline.dashboard.data import RayView, RunData
    from pipeline.runner import default_stages, run_pipeline
    from pipeline.tracking import Tracker
    from tests.pipeline.stages_for_tests import chain

    env_secret, mlflow_pw, teacher_pw = SECRETS
    server = urlparse(mlflow_server.uri)
    tracking = f"http://moeforge:{mlflow_pw}@{server.netloc}"  # the server ignores the credentials; they still count
    config = tmp_path / "planted.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "planted",
                "job": {"env_vars": {"HF_TOKEN": env_secret}},
                "data": {"num_train_prompts": 10},
                "teacher": {"base_url": f"http://teacher:{teacher_pw}@127.0.0.1:9/v1"},
                "tracking": {"uri": tracking, "experiment": "planted-secrets", "workdir": str(tmp_path / "work")},
            }
        )
    )
    cfg = load_config(str(config))
    assert cfg.job.env_vars["HF_TOKEN"] == env_secret  # what runs keeps the real values

    def clean(text: str, where: str) -> None:
        for secret in SECRETS:
            assert secret not in text, f"{secret} in {where}"

    result = run_pipeline(cfg, chain())
    printed = capfd.readouterr()  # MLflow prints "View run ... at: <tracking URI>" when a run ends, unless told not to
    clean(printed.out + printed.err, "the driver's output")
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("planted-secrets").experiment_id
    runs = client.search_runs([experiment])
    assert len(runs) == 4  # the pipeline and its three stages
    for run in runs:
        clean(repr(run.data.params) + repr(run.data.tags), f"params/tags of {run.info.run_name}")
        pending = [""]
        while pending:  # every artifact of every run, read whole
            for item in client.list_artifacts(run.info.run_id, pending.pop() or None):
                if item.is_dir:
                    pending.append(item.path)
                else:
                    local = client.download_artifacts(run.info.run_id, item.path, str(tmp_path / "dl"))
                    clean(Path(local).read_bytes().decode("utf-8", "replace"), f"artifact {item.path}")
    parent = client.get_run(result.run_id)
    assert parent.data.params["job.env_vars.HF_TOKEN"] == REDACTED  # the name is kept, the value is not
    logged = Path(client.download_artifacts(result.run_id, "config.yaml", str(tmp_path / "cfg"))).read_text()
    assert "HF_TOKEN: <redacted>" in logged and f"http://{REDACTED}@{server.netloc}" in logged

    monkeypatch.setenv("COLUMNS", "250")
    runner = CliRunner()
    shown = runner.invoke(app, ["config", "show", "--config", str(config)])
    assert shown.exit_code == 0 and "HF_TOKEN" in shown.stdout
    clean(shown.output, "config show")
    status = runner.invoke(app, ["status", result.run_id, "--config", str(config)])
    assert status.exit_code == 0, status.output
    clean(status.output, "moeforge status")

    data = RunData(Tracker(cfg.tracking), RayView(None), Dag(default_stages()))
    web = TestClient(create_app(data))
    for path in ("/api/runs", f"/api/runs/{result.run_id}", "/api/runs/latest", "/api/runs/nope"):
        clean(web.get(path).text, f"dashboard {path}")
    assert web.get("/api/runs").json()["tracking_uri"] == mlflow_server.uri  # the store, without credentials
