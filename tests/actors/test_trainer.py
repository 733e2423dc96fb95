"""The trainer role: a replica without Ray (checkpoint parts, metrics), then real Ray Train runs with two workers
over gloo: the loss falls and both replicas end with identical router biases; a worker killed mid-run restarts its
group from the latest checkpoint and the run still ends at the planned step count."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.trainer import Replica, TrainJob, expert_metrics, final_weights, fit, flops_per_step
from pipeline.config import TrainConfig
from pipeline.distill import targets as T
from tests.pipeline.distill.test_objective import CFG, teacher_row


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{**teacher_row(rng), "sample_id": f"s{i:04d}", "task": "plus_one"} for i in range(n)]


def job(**train) -> TrainJob:
    base = dict(max_steps=8, warmup_steps=1, batch_size=2, seq_len=16, lr=3e-3, checkpoint_every=4)
    return TrainJob(CFG.model_copy(update={"bias_update_speed": 0.01}), TrainConfig(**{**base, **train}), top_k=3)


# ---------------------------------------------------------------------------------------------------- no Ray


def test_a_replica_restored_from_its_checkpoint_continues_exactly(tmp_path):
    data = rows(12)
    a = Replica(job(), data)
    for _ in range(3):
        a.train_step()
    a.save(tmp_path)
    rest = [a.train_step()["loss"] for _ in range(3)]
    b = Replica(job(), data)
    b.restore(tmp_path)
    assert b.resumed_from == 3
    assert [b.train_step()["loss"] for _ in range(3)] == rest
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[k], v, rtol=0, atol=0)


def test_restore_refuses_a_checkpoint_whose_replicas_diverged(tmp_path):
    a = Replica(job(), rows(8))
    a.train_step()
    a.save(tmp_path)
    part = torch.load(tmp_path / "data_rank0.pt", weights_only=False)
    name = next(iter(part["router_biases"]))
    part["router_biases"][name] += 1
    torch.save(part, tmp_path / "data_rank0.pt")
    with pytest.raises(RuntimeError, match="router biases diverged"):
        Replica(job(), rows(8)).restore(tmp_path)


def test_step_metrics_cover_losses_throughput_mfu_and_expert_load():
    replica = Replica(job(peak_flops_per_worker=1e9), rows(8))
    m = replica.train_step()
    assert {"loss", "kd", "ce", "balance", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(m)
    assert m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1 and replica.peak_source == "configured"
    moe_layers = CFG.n_layers - CFG.n_dense_layers
    load = {k: v for k, v in m.items() if k.startswith("expert_load.")}
    assert len(load) == 3 * moe_layers
    for layer in range(CFG.n_dense_layers, CFG.n_layers):
        assert 0 <= m[f"expert_load.l{layer}.min"] <= 1 / CFG.n_routed_experts <= m[f"expert_load.l{layer}.max"]
        assert m[f"router_bias_norm.l{layer}"] > 0  # the bias update ran after the step


def test_expert_metrics_from_known_counts():
    replica = Replica(job(), rows(4))
    counts_LE = torch.tensor([[30.0, 10.0, 0.0, 0.0]])  # one MoE layer in CFG
    m = expert_metrics(replica.model, counts_LE)
    layer = CFG.n_dense_layers
    assert m[f"expert_load.l{layer}.max"] == 0.75 and m[f"expert_load.l{layer}.min"] == 0.0
    assert m[f"expert_load.l{layer}.cv"] == pytest.approx(np.std([30, 10, 0, 0]) / 10)


def test_model_flops_count_the_head_only_at_completion_positions():
    model = Replica(job(), rows(4)).model
    base = flops_per_step(model, trunk_tokens=100, head_tokens=0, seq_len=16)
    with_head = flops_per_step(model, trunk_tokens=100, head_tokens=10, seq_len=16)
    assert with_head - base == 10 * 6 * CFG.dim * CFG.vocab_size
    assert flops_per_step(model, 200, 0, 16) == 2 * base


def test_a_replica_without_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer samples than train.num_workers"):
        Replica(job(), [], rank=1, world=2)


# ---------------------------------------------------------------------------------------------------- Ray Train


def dataset(n: int):
    import ray

    return ray.data.from_arrow(pa.Table.from_pylist(rows(n), schema=T.schema("float32")))


def worker_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


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
def test_a_killed_worker_restarts_from_the_latest_checkpoint_and_finishes_the_planned_steps(tmp_path):
    store = tmp_path / "ckpt"
    j = job(num_workers=2, max_steps=60, checkpoint_every=5, max_failures=1, seq_len=32, batch_size=4)
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
    result = fit(j, dataset(24), "killme", str(store))
    watcher.join()
    assert killed, "no training worker process was found to kill"
    assert result.error is None
    assert result.metrics["step"] == 60
    assert result.metrics["resumed_from_step"] >= 5  # the restarted group began at a checkpoint, not step 0
