from __future__ import annotations

import subprocess
import sys

from pipeline.config import load_config
from pipeline.tracking import P, Tracker


def test_job_entrypoint_runs_the_pipeline_driver(tmp_path):
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "tiny", "--set",
                           f"tracking.workdir={workdir}",
                           "--set", "data.num_train_prompts=6", "--set", "teacher.max_new_tokens=40"],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = Tracker(load_config("tiny", [f"tracking.workdir={workdir}"]).tracking).pipeline_runs()
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags[P + "config_name"] == "tiny"
    bad = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--set", "train.max_steps=-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.max_steps" in bad.stderr
