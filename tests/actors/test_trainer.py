"""The trainer role on real Ray Train runs with two workers over gloo, each reading its own rows of Parquet shards:
the loss falls and both replicas end with identical router biases; every row is trained on once per epoch; a
worker killed mid-run (DDP or FSDP) restarts its group from the latest checkpoint and ends with the weights of a
run never interrupted. The replica itself, without Ray, is tested in tests/pipeline/train/."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.trainer import fit
from pipeline.train.checkpoint import final_weights, is_sharded
from pipeline.train.replica import Replica, TrainJob
from tests.pipeline.train.test_objective import CFG
from tests.pipeline.train.test_parquet_rows import write_shards
from tests.pipeline.train.test_replica import job, rows


def shards(folder: Path, n: int) -> str:
    """`n` soft-target rows as Parquet shards under `folder` (the layout `distill` writes)."""
    return str(write_shards(folder, n))


def with_data(j: TrainJob, data: str) -> TrainJob:
    return dataclasses.replace(j, data=data)


def worker_pids() -> list[int]:
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))
    ]


def registered_checkpoint(run_dir) -> bool:
    """Whether Ray Train's controller has registered a checkpoint of this run (not merely begun writing one)."""
    import json

    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return snapshot.get("latest_checkpoint_result") is not None


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_two_workers_lower_the_loss_and_keep_identical_router_biases(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    j = job(num_workers=2, max_steps=24, checkpoint_every=8)
    j.run_id, j.tracking_uri, j.data = run_id, uri, shards(tmp_path / "st", 41)
    result = fit(j, "ddp", str(tmp_path / "ckpt"))  # 41 rows: shares of 20 and 21, none dropped
    assert result.error is None and result.metrics["step"] == 24
    with result.checkpoint.as_directory() as d:
        parts = [torch.load(f"{d}/data_rank{r}.pt", weights_only=False)["router_biases"] for r in (0, 1)]
        weights = final_weights(d)
    assert parts[0] and all(b.abs().sum() > 0 for b in parts[0].values())  # the biases moved
    for name, bias in parts[0].items():
        assert torch.equal(bias, parts[1][name]) and torch.equal(bias, weights[name])
    loss = [m.value for m in client.get_metric_history(run_id, "loss")]
    assert len(loss) == 24 and np.mean(loss[-4:]) < 0.8 * np.mean(loss[:4])
    metrics = client.get_run(run_id).data.metrics
    assert metrics["tokens_per_s"] > 0 and 0 < metrics["mfu"] < 1
    assert metrics["val_samples"] > 0 and metrics["val_loss"] > 0  # rank 0 read the held-out rows itself
    assert f"expert_share.l{CFG.n_dense_layers}.e0" in metrics and f"expert_load.l{CFG.n_dense_layers}.cv" in metrics
    assert "measured fp32 matmul" in client.get_run(run_id).data.tags["moeforge.train.mfu_peak"]


def _recording_loop(config: dict) -> None:
    """`train_loop`'s input and replica, recording which rows each step trained on (per rank, per epoch)."""
    import json

    import ray.train

    from pipeline.train.loop import train_rows
    from pipeline.train.replica import Replica

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    replica = Replica(config["job"], train_rows(config["job"], rank, world), rank, world)
    with open(f"{config['out']}/rank{rank}.jsonl", "w") as f:
        while replica.step < config["job"].train.max_steps:
            replica.train_step()
            f.write(json.dumps([replica.data.capacity, replica.data.peak_buffered, replica.data.last_batch]) + "\n")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_two_workers_train_on_every_row_once_per_epoch_through_a_buffer_smaller_than_their_shards(tmp_path):
    """Two real replicas on Ray Train, each reading its own rows of the shards (`train_rows`, as `train_loop` does)
    through an input buffer capped at one batch (4 windows) while each share packs into about 16: over two whole
    epochs, every row of the dataset is trained on exactly once per epoch, by one of the two workers."""
    import json

    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    n = 96
    j = job(num_workers=2, max_steps=10, seq_len=32, batch_size=4, input_buffer_mb=0.001, val_fraction=0)
    j = with_data(j, shards(tmp_path / "st", n))
    TorchTrainer(
        _recording_loop,
        train_loop_config={"job": j, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
    ).fit()
    seen: dict[int, list[str]] = {0: [], 1: []}
    for rank in (0, 1):
        steps = [json.loads(line) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
        assert len(steps) == 10 and all(capacity == 4 and peak <= 4 for capacity, peak, _ in steps)
        epochs = [epoch for _, _, batch in steps for epoch, _ in batch]
        assert epochs[-1] >= 2  # two whole epochs done on this rank
        for _, _, batch in steps:
            for epoch, ids in batch:
                if epoch in seen:
                    seen[epoch] += ids
    for epoch, ids in seen.items():
        assert sorted(ids) == [f"s{i:04d}" for i in range(n)], epoch  # each row once, across the two workers


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_a_killed_worker_restarts_from_the_latest_checkpoint_and_finishes_the_planned_steps(tmp_path, parallelism):
    """Killed mid-epoch, with an input buffer capped at one batch (4 windows) while each worker's shard packs into
        16: the restarted group continues at the same rows, so it ends with exactly the weights of a run that was never
        interrupted. (Checkpoints every 3 steps of 4 windows fall mid-epoch.) Under FSDP the checkpoint is sharded, each
    worker writing and reading only its own shards."""
    from pipeline.train.packing import pack
    from pipeline.train.stream import buffer_windows

    store = tmp_path / "ckpt"
    j = job(
        num_workers=2,
        max_steps=14,  # 3.5 epochs of each worker's 4 batches: the run ends mid-epoch too
        checkpoint_every=3,
        max_failures=1,
        seq_len=32,
        batch_size=4,
        input_buffer_mb=0.001,
        parallelism=parallelism,
    )
    j = with_data(j, shards(tmp_path / "st", 96))
    capacity = buffer_windows(int(0.001 * 2**20), 32, j.top_k, 4)
    assert capacity == 4 and len(pack(rows(96)[:48], 32, j.top_k).tokens_BT) >= 4 * capacity
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not registered_checkpoint(store / "killme"):
            time.sleep(0.2)
        pids = worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    result = fit(j, "killme", str(store))
    watcher.join()
    assert killed, "no training worker process was found to kill"
    assert result.error is None
    assert result.metrics["step"] == 14
    assert result.metrics["resumed_from_step"] >= 3  # the restarted group began at a checkpoint, not step 0
    with result.checkpoint.as_directory() as d:
        positions = [torch.load(f"{d}/data_rank{r}.pt", weights_only=True)["position"] for r in (0, 1)]
        assert is_sharded(d) == (parallelism == "fsdp")
        resumed = final_weights(d)
    straight = fit(j, "straight", str(store))
    with straight.checkpoint.as_directory() as d:
        never_killed = final_weights(d)
    assert any(p > 0 for p in positions)  # the runs ended mid-epoch too: positions are windows, not epochs
    for name, w in never_killed.items():
        torch.testing.assert_close(resumed[name], w, rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_workers_the_cluster_cannot_place_fail_the_fit_in_bounded_time_naming_what_they_asked_for(
    tmp_path, monkeypatch
):
    """Ray Train retries a worker group that cannot start without limit by default (a controller failure): here it
    is bounded like worker failures, and the error says what the workers asked for and what the cluster has."""
    from actors.trainer import WorkerGroupNotStarted

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")  # Ray Train hands it to its controller
    j = with_data(job(num_workers=2, max_steps=2, cpus_per_worker=8, max_failures=1), shards(tmp_path / "st", 16))
    t0 = time.monotonic()
    with pytest.raises(
        WorkerGroupNotStarted,
        match=r"2 Ray Train workers of 8 CPU each could not start in 2 tries .* free: CPU [\d.]+ of 2",
    ):
        fit(j, "unplaceable", str(tmp_path / "ckpt"))
    assert time.monotonic() - t0 < 120


def test_a_worker_reads_its_starting_weights_from_a_saved_student_and_the_replica_keeps_no_copy(tmp_path):
    """On a one-node cluster the job names the initial student's folder, not a copy in the object store: a worker
    loads the weights from it (the ranks that load, under DDP every one), and its replica, once the model holds
    them, drops the job's copy instead of keeping a second student for the whole run."""
    from actors.trainer import worker_job
    from pipeline.model import Transformer

    torch.manual_seed(3)
    saved = Transformer(CFG)
    saved.save_pretrained(tmp_path / "student")
    j = with_data(dataclasses.replace(job(), initial_state=str(tmp_path / "student")), shards(tmp_path / "st", 8))
    loaded = worker_job(j, rank=1)
    assert loaded.initial_state.keys() == saved.state_dict().keys()
    replica = Replica(loaded, rows(8))
    assert replica.job.initial_state is None
    assert all(torch.equal(v, replica.model.state_dict()[k]) for k, v in saved.state_dict().items())
    fsdp = dataclasses.replace(j, train=j.train.model_copy(update={"parallelism": "fsdp"}))
    assert worker_job(fsdp, rank=1).initial_state is None  # under FSDP rank 0 alone loads, then shards


def test_the_train_stage_shows_one_progress_bar_over_its_steps_from_where_it_resumed(capsys):
    """Rank 0 moves a `tqdm_ray` bar per step (in a Ray worker it is relayed to the driver's terminal; here it
    draws in this process, throttled as there): counting the steps done before a resume, closed at the last."""
    from actors.trainer import RayTrainHooks

    hooks = RayTrainHooks(dataclasses.replace(job(), train=job().train.model_copy(update={"max_steps": 6})))
    for step in (4, 5, 6):  # resumed at step 3
        hooks.advance(step)
    assert hooks._bar.n == 6 and hooks._bar._closed
    assert "train: 100%" in capsys.readouterr().err
