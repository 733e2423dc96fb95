"""The student as an MLflow model: logged, registered, loaded in a fresh process through `models:/`, generating."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

LOAD = """
import sys, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(pd.DataFrame({"prompt": ["What is 2 + 2?", "Calculate 3 + 5."]}), params={"max_new_tokens": 6})
print(repr(out))
"""


def test_a_logged_student_loads_by_alias_in_a_fresh_process_and_generates(registered_student):
    """`registered_student` (tests/conftest.py) saved a student and logged it with `log_student` as version 1."""
    s = registered_student
    version = MlflowClient(s.tracking_uri).get_model_version_by_alias(s.name, "champion")
    assert str(version.version) == "1" and version.run_id
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, s.tracking_uri, f"models:/{s.name}@champion"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = eval(proc.stdout.strip().splitlines()[-1])  # the repr printed by our own child process
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(t, str) for t in out)


def test_logging_a_student_leaves_the_process_tracking_uri_alone(registered_student, tmp_path, monkeypatch):
    """`mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI process-wide: logging into one store must not
    redirect what later code (a pipeline run resolving its default store) writes to."""
    import os

    import mlflow

    from pipeline.student.registry import log_student

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("other", artifact_location=str(tmp_path / "a")))
    log_student(registered_student.directory, run.info.run_id, uri, "other-student")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() != uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    log_student(registered_student.directory, client.create_run(run.info.experiment_id).info.run_id, uri)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://example.invalid:5000"
