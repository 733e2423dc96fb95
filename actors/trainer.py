"""The trainer role on Ray Train: every worker runs one `Replica` (`pipeline/train/replica.py`).

`train_loop` is the body of every Ray Train worker: it streams the worker's own rows of the soft-target shards
(`pipeline/train/parquet_rows.py`, read by the worker itself), restores from
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
from pathlib import Path
from typing import Any

import torch

from pipeline.train.expert_metrics import expert_shares, shares
from pipeline.train.parquet_rows import RankRows, first_rows
from pipeline.train.replica import Replica, TrainJob
from pipeline.train.split import is_held_out

log = logging.getLogger(__name__)

__all__ = ["TrainJob", "fit", "held_out_rows", "train_loop", "train_rows"]


class StepLog:
    """Rank 0's MLflow writer: step metrics sent with MLflow's async logging, plus the node's system metrics."""

    def __init__(self, job: TrainJob):
        from mlflow import MlflowClient

        if job.run_id is None:
            raise ValueError("StepLog needs TrainJob.run_id: the MLflow run rank 0 logs to")
        self.client, self.run_id = MlflowClient(job.tracking_uri), job.run_id
        self.pending: list = []  # MLflow's RunOperations of the async logging, waited on by `wait`
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


def train_rows(job: TrainJob, rank: int, world: int) -> RankRows:
    """This worker's training rows of `job.data`: its contiguous share, the held-out samples skipped."""
    t = job.train
    if job.data is None:
        raise ValueError("TrainJob.data is not set: the soft-target shards to train on")

    def keep(row: dict) -> bool:
        return not is_held_out(row["sample_id"], t.val_fraction, t.seed)

    return RankRows(job.data, rank, world, t.seed, keep=keep)


def held_out_rows(job: TrainJob) -> list[dict]:
    """The validation rows: the first `val_max_samples` held-out samples of `job.data`, in file order."""
    t = job.train
    if t.val_fraction <= 0 or job.data is None:
        return []
    return first_rows(job.data, lambda r: is_held_out(r["sample_id"], t.val_fraction, t.seed), t.val_max_samples)


def worker_job(job: TrainJob, rank: int) -> TrainJob:
    """The job as this worker needs it: the starting state fetched from the object store where this rank loads it
    (every rank under DDP, rank 0 alone under FSDP) and the validation rows read where this rank validates."""
    import ray

    sharded = job.train.parallelism == "fsdp"
    if job.data is None:
        raise ValueError("TrainJob.data is not set: the workers read their rows from the soft-target shards")
    if isinstance(job.initial_state, ray.ObjectRef):
        job = dataclasses.replace(job, initial_state=ray.get(job.initial_state) if rank == 0 or not sharded else None)
    if not job.val_rows and (rank == 0 or sharded):  # under FSDP every rank validates (collectives)
        job = dataclasses.replace(job, val_rows=held_out_rows(job))
    return job


def train_loop(config: dict[str, Any]) -> None:
    """The body of every Ray Train worker; `config["job"]` is the `TrainJob`."""
    import ray
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.train.cpus_per_worker)))
    sharded = job.train.parallelism == "fsdp"
    if sharded:  # a DDP replica frees nothing large per step; its allocations stay on glibc's fast path
        return_large_frees_to_the_os()
    job = worker_job(job, rank)
    replica = Replica(job, train_rows(job, rank, world), rank, world, device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            replica.restore(Path(d))
        log.info("rank %d: resumed from the checkpoint of step %d", rank, replica.resumed_from)
    step_log = StepLog(job) if rank == 0 and job.run_id else None
    if step_log:
        open_step_log(step_log, replica, world, device)
    elif sharded and replica.step == 0:
        replica.validate()  # rank 0's first validation is a collective under FSDP
    try:
        train_steps(job, replica, rank, step_log)
        rows = {f"rows_epoch{e}": float(n) for e, n in sorted(replica.data.rows_trained.items())}
        figures = every_rank({**replica.held_bytes(), "epoch": float(replica.data.epoch), **rows})
        if step_log:  # what each rank held at its peak, and how many rows it trained on per epoch
            step_log.log(figures, replica.step)
    finally:
        if step_log:
            step_log.close()


def return_large_frees_to_the_os(threshold: int = 1 << 20) -> None:
    """Make glibc serve every allocation of `threshold` bytes or more with its own mmap, returned when freed.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which blocks that size
    come from the heap and are kept by the process once freed: an FSDP rank, which gathers and frees a block's
    weights twice per step, grows by hundreds of MiB of freed memory it never gives back. A fixed threshold keeps
    the resident memory what the tensors hold. A no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD (malloc.h); setting it also turns the dynamic one off


def train_steps(job: TrainJob, replica: Replica, rank: int, step_log: StepLog | None) -> None:
    """Step to `max_steps`: live metrics, MLflow metrics (rank 0), validation, checkpoints."""
    cfg = job.train
    while replica.step < cfg.max_steps:
        metrics = replica.train_step()
        step = replica.step
        save = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        if rank == 0:
            record_step(job, replica, metrics, step)
        if step_log or (replica.sharded and evaluates(replica)):
            log_step(step_log, replica, metrics, save)
        if save:  # report (a barrier across workers) only with a checkpoint; step metrics go to MLflow
            report_checkpoint(replica, metrics, step_log)


def every_rank(figures: dict[str, float]) -> dict[str, float]:
    """This rank's figures gathered from every rank, named `<figure>.rank<r>` (a collective)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return {f"{k}.rank0": v for k, v in figures.items()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, figures)
    return {f"{k}.rank{r}": v for r, mine in enumerate(gathered) for k, v in mine.items()}


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
            "val_samples": len(replica.job.val_rows),
            **(replica.validate() if replica.step == 0 else {}),
        },
        replica.step,
    )


def evaluates(replica: Replica) -> bool:
    """Whether this step measures the validation loss (every `eval_every` steps and at the last)."""
    return replica.step % replica.cfg.eval_every == 0 or replica.step == replica.cfg.max_steps


def log_step(step_log: StepLog | None, replica: Replica, metrics: dict[str, float], save: bool) -> None:
    """A step's metrics to MLflow; with a checkpoint the experts' load, every `eval_every` the validation loss.

    Under FSDP the other ranks call it too, without a log, for the validation forward's collectives."""
    if save:
        metrics.update(expert_shares(replica.model, replica.last_counts))
    if evaluates(replica):
        metrics.update(replica.validate())
    if step_log:
        step_log.log(metrics, replica.step)


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


def fit(job: TrainJob, run_name: str, storage_path: str):
    """Train on the soft-target shards at `job.data` with `job.train.num_workers` Ray Train workers, each reading
    its own rows (nothing passes through the driver or the object store).

    The same `run_name` and `storage_path` continue the latest checkpoint stored there. Returns the Train
    `Result` (its `checkpoint` is the final one).
    """
    from ray.train.torch import TorchConfig

    # Ray Train V2 (Ray's default trainer), named explicitly: `ray.train`'s names switch on RAY_TRAIN_V2_ENABLED at
    # import time, so a type checker reads V1's classes there (no `worker_runtime_env`, a dict-only loop config)
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    from pipeline.train.parquet_rows import rank_pieces, row_groups

    cfg = job.train
    if job.data is None:
        raise ValueError("TrainJob.data is not set: the soft-target shards to train on")
    rank_pieces(row_groups(job.data)[1], 0, cfg.num_workers)  # here, before the workers start: enough rows?
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
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
