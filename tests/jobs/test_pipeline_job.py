from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import load_config
from pipeline.tracking import P, Tracker


SMALL = [f"{k}={v}" for k, v in {"data.num_train_prompts": 6, "data.num_eval_prompts": 2, "teacher.max_new_tokens": 40,
                                 "train.max_steps": 2, "train.batch_size": 2, "evaluate.max_new_tokens": 16}.items()]


@pytest.mark.timeout(600)
def test_job_entrypoint_runs_the_pipeline_driver(tmp_path):
    workdir = tmp_path / "w"
    sets = [a for s in [f"tracking.workdir={workdir}", *SMALL] for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "tiny", *sets],
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = Tracker(load_config("tiny", [f"tracking.workdir={workdir}"]).tracking).pipeline_runs()
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags[P + "config_name"] == "tiny"
    stages = Tracker(load_config("tiny", [f"tracking.workdir={workdir}"]).tracking).stage_runs(runs[0].info.run_id)
    assert sorted(r.info.run_name for r in stages) == ["distill", "evaluate", "generate", "register", "train"]
    bad = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--set", "train.max_steps=-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.max_steps" in bad.stderr
