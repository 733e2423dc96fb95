"""A worker's training run without Ray: `train_steps` on a plain `Replica`, the runtime's part passed as hooks."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.loop import train_steps
from pipeline.train.replica import Replica
from tests.pipeline.train.test_replica import job, rows


class RecordingHooks:
    """`StepHooks` that keep what the loop handed them: the steps recorded and the checkpoints, saved to disk."""

    def __init__(self, folder):
        self.folder, self.recorded, self.checkpoints = folder, [], []

    def record(self, replica, metrics):
        self.recorded.append((replica.step, metrics["loss"]))

    def checkpoint(self, replica, metrics):
        (folder := self.folder / f"step_{replica.step}").mkdir(parents=True)
        replica.save(folder)
        self.checkpoints.append(replica.step)


def test_the_loop_steps_to_max_steps_records_every_step_and_checkpoints_on_schedule(tmp_path):
    j = job(max_steps=7, checkpoint_every=3)
    replica, hooks = Replica(j, rows(12)), RecordingHooks(tmp_path)
    train_steps(j, replica, rank=0, step_log=None, hooks=hooks)
    assert replica.step == 7
    assert [s for s, _ in hooks.recorded] == list(range(1, 8)) and all(loss > 0 for _, loss in hooks.recorded)
    assert hooks.checkpoints == [3, 6, 7]  # every checkpoint_every steps, and the last


class Killed(Exception):
    pass


class DyingAfterFirstCheckpoint(RecordingHooks):
    def checkpoint(self, replica, metrics):
        super().checkpoint(replica, metrics)
        raise Killed  # the worker dies right after its first checkpoint is stored


def test_a_replica_restored_from_a_hooks_checkpoint_finishes_as_the_uninterrupted_run(tmp_path):
    j, data = job(max_steps=6, checkpoint_every=3), rows(12)
    straight = Replica(j, data)
    train_steps(j, straight, rank=0, step_log=None, hooks=RecordingHooks(tmp_path / "a"))
    with pytest.raises(Killed):
        train_steps(j, Replica(j, data), rank=0, step_log=None, hooks=DyingAfterFirstCheckpoint(tmp_path / "b"))
    resumed = Replica(j, data)
    resumed.restore(tmp_path / "b" / "step_3")
    later = RecordingHooks(tmp_path / "c")
    train_steps(j, resumed, rank=1, step_log=None, hooks=later)  # rank 1: no live metrics recorded
    assert later.recorded == [] and later.checkpoints == [6]
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
