"""The trainer role on real Ray Train runs with two workers over gloo: the loss falls and both replicas end with
identical router biases; a worker killed mid-run restarts its group from the latest checkpoint and the run still
ends at the planned step count. The replica itself, without Ray, is tested in tests/pipeline/train/."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.trainer import fit
from pipeline.stages.artifact_specs import soft_targets_schema
from pipeline.train.checkpoint import final_weights
from tests.pipeline.train.test_objective import CFG
from tests.pipeline.train.test_replica import job, rows


def dataset(n: int):
    import ray

    return ray.data.from_arrow(pa.Table.from_pylist(rows(n), schema=soft_targets_schema("float32")))


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
    j.run_id, j.tracking_uri = run_id, uri
    result = fit(j, dataset(41), "ddp", str(tmp_path / "ckpt"))  # 41 rows: shards of 20 and 21, none dropped
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
    assert f"expert_share.l{CFG.n_dense_layers}.e0" in metrics and f"expert_load.l{CFG.n_dense_layers}.cv" in metrics
    assert "measured fp32 matmul" in client.get_run(run_id).data.tags["moeforge.train.mfu_peak"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_the_split_shards_streamed_through_a_small_buffer_give_every_row_once_per_epoch():
    """The workers' input path without the training: the Ray Data split of `fit` and `shard_rows`, into streams whose
    buffer holds a small fraction of the data; over one epoch per rank, every row is trained on exactly once."""
    from actors.trainer import contiguous_split, shard_rows
    from pipeline.train.stream import WindowStream, window_bytes

    n = 300
    ds = dataset(n)
    split = contiguous_split(ds, 2).configure({"train": ds}, world_size=2)
    seen, buffered = [], 0
    for rank in range(2):
        stream = WindowStream(
            shard_rows(split[rank]["train"], rows_per_read=16), seq_len=16, k=3, buffer_windows=4, seed=0, rank=rank
        )
        while True:
            window = stream.next_window()
            if stream.epoch != 0:
                break
            seen += window.sample_ids
        buffered = max(buffered, stream.peak_buffered)
    assert sorted(seen) == sorted(f"s{i:04d}" for i in range(n))  # nothing dropped, nothing twice
    data_bytes = sum(len(r["token_ids"]) for r in rows(n)) / 16 * window_bytes(16, 3)
    assert buffered == 4 and data_bytes > 20 * buffered * window_bytes(16, 3)


def _recording_loop(config: dict) -> None:
    """`train_loop`'s input and replica, recording which rows each step trained on (per rank, per epoch)."""
    import json

    import ray.train

    from actors.trainer import shard_rows
    from pipeline.train.replica import Replica

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    replica = Replica(config["job"], shard_rows(ray.train.get_dataset_shard("train")), rank, world)
    with open(f"{config['out']}/rank{rank}.jsonl", "w") as f:
        while replica.step < config["job"].train.max_steps:
            replica.train_step()
            f.write(json.dumps([replica.data.capacity, replica.data.peak_buffered, replica.data.last_batch]) + "\n")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_two_workers_train_on_every_row_once_per_epoch_through_a_buffer_smaller_than_their_shards(tmp_path):
    """Two real replicas on Ray Train, fed by `fit`'s split and `shard_rows` through an input buffer capped at one
    batch (4 windows) while each shard packs into about 16: over two whole epochs, every row of the dataset is
    trained on exactly once per epoch, by one of the two workers."""
    import json

    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.trainer import contiguous_split

    n = 96
    j = job(num_workers=2, max_steps=10, seq_len=32, batch_size=4, input_buffer_mb=0.001)
    ds = dataset(n)
    TorchTrainer(
        _recording_loop,
        train_loop_config={"job": j, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        datasets={"train": ds},
        dataset_config=contiguous_split(ds, 2),
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
def test_a_killed_worker_restarts_from_the_latest_checkpoint_and_finishes_the_planned_steps(tmp_path):
    """Killed mid-epoch, with an input buffer capped at one batch (4 windows) while each worker's shard packs into
    16: the restarted group continues at the same rows, so it ends with exactly the weights of a run that was never
    interrupted. (Checkpoints every 3 steps of 4 windows fall mid-epoch.)"""
    from pipeline.train.packing import pack
    from pipeline.train.stream import buffer_windows

    store = tmp_path / "ckpt"
    j = job(
        num_workers=2, max_steps=30, checkpoint_every=3, max_failures=1, seq_len=32, batch_size=4, input_buffer_mb=0.001
    )
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
    result = fit(j, dataset(96), "killme", str(store))
    watcher.join()
    assert killed, "no training worker process was found to kill"
    assert result.error is None
    assert result.metrics["step"] == 30
    assert result.metrics["resumed_from_step"] >= 3  # the restarted group began at a checkpoint, not step 0
    with result.checkpoint.as_directory() as d:
        positions = [torch.load(f"{d}/data_rank{r}.pt", weights_only=True)["position"] for r in (0, 1)]
        resumed = final_weights(d)
    straight = fit(j, dataset(96), "straight", str(store))
    with straight.checkpoint.as_directory() as d:
        never_killed = final_weights(d)
    assert any(p > 0 for p in positions)  # the runs ended mid-epoch too: positions are windows, not epochs
    for name, w in never_killed.items():
        torch.testing.assert_close(resumed[name], w, rtol=0, atol=0, msg=name)
