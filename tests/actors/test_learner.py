"""refine's learner role on a real Ray Train worker group kept for the whole stage: two DDP ranks update a small
student on its samples iteration after iteration; a rank continuing in memory and one rebuilt from the handed-back
state make the same update; a worker SIGKILLed between two updates costs a group restart, not a result."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray
import torch

from actors.learner import LearnerGroup
from actors.object_store import CarriedState
from pipeline.config import RefineConfig
from pipeline.model import Transformer
from tests.actors.test_trainer import worker_pids
from tests.pipeline.train.test_policy_learner import sample
from tests.pipeline.train.test_policy_losses import CFG

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(600)]


def update(group: LearnerGroup, i: int, state: dict, samples: list) -> tuple:
    """(metrics, the new state) of iteration `i` from `state`, as the refine stage runs it."""
    carried = CarriedState(state)
    carried.publish()
    metrics = group.update(i, carried, None, samples)
    return metrics, carried.state


def assert_same_state(a: dict, b: dict) -> None:
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            torch.testing.assert_close(b["optimizer"]["state"][k][name], t, rtol=0, atol=0, msg=f"{k}.{name}")


def test_one_group_updates_every_iteration_in_memory_as_from_the_state_it_handed_back(tmp_path):
    torch.manual_seed(0)
    student, teacher = Transformer(CFG), Transformer(CFG).eval()
    rng = np.random.default_rng(0)
    batches = [[sample(rng, teacher, advantage=float(a)) for a in (1, -1, 1, -1, 0, 0)] for _ in range(2)]
    cfg = RefineConfig(objective="both", num_workers=2, updates_per_iteration=1, lr=1e-3, max_failures=1)
    start = {"model": student.state_dict(), "optimizer": None}
    with LearnerGroup(CFG, cfg, 8, "learner-test", str(tmp_path), channel_name="learner-test.channel") as group:
        metrics, first = update(group, 0, start, batches[0])
        assert metrics.learner_tokens == sum(len(s.tokens) - s.start for s in batches[0])  # both ranks'
        assert metrics.reverse_kl > 0 and 0 < metrics.routing_agreement <= 1
        assert any(not torch.equal(student.state_dict()[k], v) for k, v in first["model"].items())
        assert first["optimizer"]["state"]  # AdamW's moments, for the next iteration
        pids = worker_pids()
        assert len(pids) == 2
        _, in_memory = update(group, 1, first, batches[1])  # both ranks go on from their own model
        assert sorted(worker_pids()) == sorted(pids)  # the same workers: no group started per iteration
        # the same job again: the ranks have moved past it, so they rebuild from the job's state
        _, rebuilt = update(group, 1, first, batches[1])
        assert_same_state(in_memory, rebuilt)
        # a worker killed between iterations: Ray Train restarts the group, which rebuilds and updates the same
        os.kill(pids[-1], signal.SIGKILL)
        _, restarted = update(group, 1, first, batches[1])
        assert not set(worker_pids()) & set(pids)
        assert_same_state(in_memory, restarted)
        assert ray.get(group.channel.status.remote()) == {"iteration": None, "updating": []}


def test_a_group_that_cannot_recover_fails_the_update_with_its_cause(tmp_path):
    torch.manual_seed(0)
    student = Transformer(CFG)
    cfg = RefineConfig(objective="opd", num_workers=2, updates_per_iteration=1, max_failures=0)
    bad: list = []  # no samples: every rank refuses the update (PolicyLearner.parts)
    failed = pytest.raises(RuntimeError, match=r"(?s)failed after 0 restart\(s\).*0 samples for 1 updates")
    with LearnerGroup(CFG, cfg, 8, "learner-fail", str(tmp_path)) as group, failed:
        update(group, 0, {"model": student.state_dict(), "optimizer": None}, bad)


def test_a_group_the_cluster_cannot_place_fails_the_update_in_bounded_time_naming_what_it_asked_for(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    student = Transformer(CFG)
    cfg = RefineConfig(objective="opd", num_workers=2, num_cpus_per_actor=8, updates_per_iteration=1, max_failures=1)
    t0 = time.monotonic()
    failed = pytest.raises(
        RuntimeError, match=r"2 Ray Train workers of 8 CPU each could not start in 2 tries .*lower refine.num_workers"
    )
    with LearnerGroup(CFG, cfg, 8, "learner-unplaceable", str(tmp_path)) as group, failed:
        update(group, 0, {"model": student.state_dict(), "optimizer": None}, [])
    assert time.monotonic() - t0 < 120
