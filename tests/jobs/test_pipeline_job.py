"""The job entrypoints as processes, on the errors they must report before touching a cluster. (The whole pipeline
as a submitted Ray job, and a stage job on cached inputs: tests/jobs/test_cluster.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs import STAGE_JOBS
from pipeline.runner import default_stages


def test_there_is_a_job_for_every_stage():
    assert set(STAGE_JOBS) | {"serve"} == {s.name for s in default_stages()}


@pytest.mark.slow  # a driver process
@pytest.mark.timeout(300)
def test_a_stage_job_without_cached_inputs_fails_naming_what_to_run_first(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", "tiny", "--set", f"tracking.workdir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--only train: upstream stage 'generate' has no finished run" in proc.stderr.replace("\n", " ")
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr  # decided before any Ray work


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_bad_config_is_reported_with_the_key(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--set", "train.max_steps=-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "train.max_steps" in bad.stderr
