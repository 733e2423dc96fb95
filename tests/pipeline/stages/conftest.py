"""The teacher's part of a small run, shared by the stage tests that start after it."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.runner import run_pipeline

# 12 training and 4 held-out prompts, short answers: what the stage tests after `distill` train and convert on
TEACHER_SAMPLES = [
    "data.num_train_prompts=12",
    "data.num_eval_prompts=4",
    "teacher.max_new_tokens=40",
    "generate.shard_size=6",
]


@pytest.fixture(scope="session")
def upstream(ray_cluster, tmp_path_factory):
    """A workdir where generate and distill already ran on TEACHER_SAMPLES (the teacher's part, once per session)."""
    workdir = tmp_path_factory.mktemp("upstream") / "w"
    run_pipeline(load_config("tiny", [f"tracking.workdir={workdir}", *TEACHER_SAMPLES]), until="distill")
    return workdir
