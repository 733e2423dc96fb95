"""refine's learner role on a real Ray Train worker group: two DDP ranks update a small student on its samples, and
a second `learn` of the same run (a driver that died after the update) returns that update without training."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch

from actors.learner import LearnerJob, learn
from pipeline.config import RefineConfig
from pipeline.model import Transformer
from tests.pipeline.train.test_policy_learner import sample
from tests.pipeline.train.test_policy_losses import CFG

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(600)]


def test_two_ranks_update_the_student_and_a_reported_update_is_not_redone(tmp_path):
    torch.manual_seed(0)
    student, teacher = Transformer(CFG), Transformer(CFG).eval()
    rng = np.random.default_rng(0)
    samples = [sample(rng, teacher, advantage=float(a)) for a in (1, -1, 1, -1, 0, 0)]
    cfg = RefineConfig(objective="both", num_workers=2, updates_per_iteration=1, lr=1e-3)
    job = LearnerJob(CFG, cfg, 0, ray.put(student.state_dict()), None, None, ray.put(samples), 8)
    metrics, state = learn(job, "learner-test", str(tmp_path))
    assert metrics["learner_tokens"] == sum(len(s.tokens) - s.start for s in samples)  # both ranks' tokens
    assert metrics["reverse_kl"] > 0 and 0 < metrics["routing_agreement"] <= 1
    before = student.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in state["model"].items())
    assert state["optimizer"]["state"]  # AdamW's moments, for the next iteration

    t0 = time.perf_counter()
    again, same = learn(job, "learner-test", str(tmp_path))
    assert again == metrics
    assert all(torch.equal(same["model"][k], v) for k, v in state["model"].items())
    print(f"second learn: {time.perf_counter() - t0:.1f} s (no training)")
