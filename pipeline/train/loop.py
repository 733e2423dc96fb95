"""One training worker's run, in plain PyTorch and MLflow: its rows of the soft-target shards, the steps of its
`Replica` to `max_steps`, validation, and rank 0's MLflow step log.

The distributed runtime around it is the caller's: `actors/trainer.py` runs `train_steps` in every Ray Train worker
and passes the two things only Ray does as `StepHooks` (reporting a checkpoint, which is a barrier across the
workers, and the live Ray metrics of a step).
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from pipeline.train.expert_metrics import expert_shares
from pipeline.train.parquet_rows import RankRows, first_rows
from pipeline.train.replica import Replica, TrainJob
from pipeline.train.split import is_held_out

log = logging.getLogger(__name__)


class StepHooks(Protocol):
    """What the distributed runtime does at a step: `record` (rank 0, every step) and `checkpoint` (every rank,
    every `checkpoint_every` steps and at the last; the step's metrics are already on the MLflow run)."""

    def record(self, replica: Replica, metrics: dict[str, float]) -> None: ...

    def checkpoint(self, replica: Replica, metrics: dict[str, float]) -> None: ...


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


def train_steps(job: TrainJob, replica: Replica, rank: int, step_log: StepLog | None, hooks: StepHooks) -> None:
    """Step to `max_steps`: live metrics (rank 0), MLflow metrics, validation, checkpoints."""
    cfg = job.train
    while replica.step < cfg.max_steps:
        metrics = replica.train_step()
        step = replica.step
        save = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        if rank == 0:
            hooks.record(replica, metrics)
        if step_log or (replica.sharded and evaluates(replica)):
            log_step(step_log, replica, metrics, save)
        if save:  # a checkpoint is a barrier across workers; step metrics go to MLflow without one
            if step_log:
                step_log.wait()  # metrics up to a checkpoint are on the run before the checkpoint exists
            hooks.checkpoint(replica, metrics)


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
