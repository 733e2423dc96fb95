"""The trainer role on Ray Train: every worker runs one `Replica` (`pipeline/train/replica.py`).

`train_loop` is the body of every Ray Train worker: it streams the worker's shard of the soft targets, restores from
`ray.train.get_checkpoint()`, steps the replica, reports a checkpoint every `checkpoint_every` steps, and on rank 0
logs the step metrics to the stage's MLflow run (MLflow's async logging, waited for before each checkpoint) and
records them as live Ray metrics. `fit` builds the `TorchTrainer` (Train V2) with a deterministic
`RunConfig(name, storage_path)`, so a pipeline rerun after a driver crash continues from the latest checkpoint
instead of step 0. The training math, the checkpoint format and the metrics are in `pipeline/train/`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.train.expert_metrics import expert_shares, shares
from pipeline.train.replica import Replica, TrainJob
from pipeline.train.stream import RowSource

log = logging.getLogger(__name__)

__all__ = ["TrainJob", "contiguous_split", "fit", "shard_rows", "train_loop"]


class StepLog:
    """Rank 0's MLflow writer: step metrics sent with MLflow's async logging, plus the node's system metrics."""

    def __init__(self, job: TrainJob):
        from mlflow import MlflowClient

        self.client, self.run_id, self.pending = MlflowClient(job.tracking_uri), job.run_id, []
        self.system = None
        try:  # CPU, memory, disk, network (and GPU when pynvml is present) of this worker's node
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system = SystemMetricsMonitor(
                job.run_id, sampling_interval=5, resume_logging=True, tracking_uri=job.tracking_uri
            )
            self.system.start()
        except Exception:  # noqa: BLE001 - system metrics are optional (psutil missing, platform quirks)
            self.system = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def tag(self, tags: dict[str, object]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def wait(self) -> None:
        """Block until every metric logged so far is on the run (raises if MLflow refused any)."""
        pending, self.pending = self.pending, []
        for operations in pending:
            operations.wait()

    def close(self) -> None:
        self.wait()
        if self.system is not None:
            self.system.finish()


def contiguous_split(dataset, world_size: int):
    """A Ray Train `DataConfig` that gives every row to exactly one worker.

    Ray Train's default split (`streaming_split(equal=True)`) drops up to `num_workers - 1` rows to make shards
    equal, and hands blocks out as workers ask. Here the dataset is materialized and cut at fixed row indices
    now, before the workers take the cluster's CPUs (a split run later, from inside training, would wait for CPUs
    the workers hold): shards differ by at most one row, nothing is dropped, and rank r gets the same rows on every
    attempt, so a restarted worker continues its own data order. DDP does not need equal shards: every replica
    takes the same number of windows per step and cycles through its own.
    """
    from ray.train import DataConfig

    dataset.context.execution_options.preserve_order = True  # file order: the same rows per rank on every run
    ds = dataset.materialize()
    n = ds.count()
    if n < world_size:
        raise ValueError(
            f"the soft-target dataset has {n} rows, fewer than train.num_workers ({world_size}): "
            "every worker needs at least one sample"
        )
    cuts = [n * i // world_size for i in range(1, world_size)]
    parts = ds.split_at_indices(cuts) if cuts else [ds]
    for part in parts:  # a worker reads its shard once; a progress bar there would linger for the whole run
        part.context.enable_progress_bars = False

    class ContiguousSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles=None, worker_node_ids=None, **kwargs):
            return [{name: parts[rank].iterator() for name in datasets} for rank in range(world_size)]

    return ContiguousSplit()


def shard_rows(shard, rows_per_read: int = 256) -> RowSource:
    """One pass over this worker's Ray Data shard per call, streamed a few hundred rows at a time in the shard's
    fixed order (the input stream packs and shuffles them within its bounded buffer; `pipeline/train/stream.py`)."""

    def rows() -> Iterator[dict]:
        for table in shard.iter_batches(batch_format="pyarrow", batch_size=rows_per_read, prefetch_batches=1):
            yield from table.to_pylist()

    return rows


def train_loop(job: TrainJob) -> None:
    """The body of every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.train.cpus_per_worker)))
    if isinstance(job.initial_state, ray.ObjectRef):
        job = dataclasses.replace(job, initial_state=ray.get(job.initial_state))
    replica = Replica(job, shard_rows(ray.train.get_dataset_shard("train")), rank, world, device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            replica.restore(Path(d))
        log.info("rank %d: resumed from the checkpoint of step %d", rank, replica.resumed_from)
    step_log = StepLog(job) if rank == 0 and job.run_id else None
    if step_log:
        open_step_log(step_log, replica, world, device)
    cfg = job.train
    try:
        while replica.step < cfg.max_steps:
            metrics = replica.train_step()
            step = replica.step
            save = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
            if rank == 0:
                record_step(job, replica, metrics, step)
            if step_log:
                log_step(step_log, replica, metrics, save)
            if save:  # report (a barrier across workers) only with a checkpoint; step metrics go to MLflow
                report_checkpoint(replica, metrics, step_log)
    finally:
        if step_log:
            step_log.close()


def open_step_log(step_log: StepLog, replica: Replica, world: int, device) -> None:
    """Rank 0's first entries: how the run is set up, where it resumed, and the validation loss before training."""
    step_log.tag(
        {
            "moeforge.train.mfu_peak": f"{replica.peak:.3g} FLOP/s per worker ({replica.peak_source})",
            "moeforge.train.workers": world,
            "moeforge.train.device": str(device),
        }
    )
    step_log.log(
        {
            "resumed_from_step": replica.resumed_from,
            "input_buffer_windows": replica.data.capacity,
            **(replica.validate() if replica.step == 0 else {}),
        },
        replica.step,
    )


def log_step(step_log: StepLog, replica: Replica, metrics: dict[str, float], save: bool) -> None:
    """A step's metrics to MLflow; with a checkpoint the experts' load, every `eval_every` the validation loss."""
    cfg, step = replica.cfg, replica.step
    if save:
        metrics.update(expert_shares(replica.model, replica.last_counts))
    if step % cfg.eval_every == 0 or step == cfg.max_steps:
        metrics.update(replica.validate())
    step_log.log(metrics, step)


def report_checkpoint(replica: Replica, metrics: dict[str, float], step_log: StepLog | None) -> None:
    """Save the replica's state and report it to Ray Train (a barrier across workers)."""
    import ray.train

    if step_log:
        step_log.wait()  # metrics up to a checkpoint are on the run before the checkpoint exists
    step = replica.step
    with tempfile.TemporaryDirectory() as d:
        replica.save(Path(d))
        ray.train.report(
            {"step": step, "loss": metrics["loss"], "resumed_from_step": replica.resumed_from},
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"step_{step:06d}",
        )


def record_step(job: TrainJob, replica: Replica, metrics: dict[str, float], step: int) -> None:
    """Rank 0's live Ray metrics of a step: loss, throughput, and the layer x expert load of the router."""
    from pipeline.metrics import record

    tags = {"run": job.parent_run_id, "stage": "train"}
    record("moeforge_train_step", step, **tags)
    record("moeforge_train_loss", metrics["loss"], **tags)
    record("moeforge_train_tokens_per_second", metrics["tokens_per_s"], **tags)
    record("moeforge_train_tokens", replica.cfg.batch_size * replica.cfg.seq_len * replica.world, **tags)
    for layer, _, share_E in shares(replica.model, replica.last_counts):
        for e, share in enumerate(share_E.tolist()):
            record("moeforge_expert_load", share, layer=layer, expert=e, **tags)


def fit(job: TrainJob, dataset, run_name: str, storage_path: str):
    """Train on `dataset` (a Ray Dataset of soft-target rows) with `job.train.num_workers` Ray Train workers.

    The same `run_name` and `storage_path` continue the latest checkpoint stored there. Returns the Train
    `Result` (its `checkpoint` is the final one).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = job.train
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": dataset},
        dataset_config=contiguous_split(dataset, cfg.num_workers),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": _worker_env()},
        ),
    )
    return trainer.fit()


def _worker_env() -> dict[str, str]:
    """Environment the workers need from the driver's (the package path when run from a checkout)."""
    return {k: os.environ[k] for k in ("PYTHONPATH", "MOEFORGE_CACHE_DIR") if k in os.environ}
