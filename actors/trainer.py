"""The trainer role on Ray Train: a thin wrapper that runs `pipeline/train/loop.py` in every Ray Train worker.

`train_loop` is the body of every worker: it takes its rank, world size and device from Ray Train, fetches the
starting state from the object store, restores from `ray.train.get_checkpoint()`, and runs the plain training loop
(`pipeline.train.loop.train_steps`) with `RayTrainHooks`: a checkpoint reported to Ray Train every
`checkpoint_every` steps, and rank 0's step metrics recorded as live Ray metrics. `fit` builds the `TorchTrainer`
(Train V2) with a deterministic `RunConfig(name, storage_path)`, so a pipeline rerun after a driver crash continues
from the latest checkpoint instead of step 0. The training math, the checkpoint format and the metrics are in
`pipeline/train/`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.model.transformer import saved_weights
from pipeline.train.expert_metrics import shares
from pipeline.train.loop import (
    StepLog,
    every_rank,
    held_out_rows,
    open_step_log,
    return_large_frees_to_the_os,
    train_rows,
    train_steps,
)
from pipeline.train.replica import Replica, TrainJob

log = logging.getLogger(__name__)

__all__ = ["TrainJob", "fit", "train_loop"]


def worker_job(job: TrainJob, rank: int) -> TrainJob:
    """The job as this worker needs it: the starting state fetched from the object store where this rank loads it
    (every rank under DDP, rank 0 alone under FSDP) and the validation rows read where this rank validates."""
    import ray

    sharded = job.train.parallelism == "fsdp"
    if job.data is None:
        raise ValueError("TrainJob.data is not set: the workers read their rows from the soft-target shards")
    loads = rank == 0 or not sharded
    if isinstance(job.initial_state, ray.ObjectRef):
        job = dataclasses.replace(job, initial_state=ray.get(job.initial_state) if loads else None)
    elif isinstance(job.initial_state, str | Path):  # a saved student's folder on this node
        job = dataclasses.replace(job, initial_state=saved_weights(Path(job.initial_state)) if loads else None)
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
    job = replica.job  # without the starting weights, which the model holds now
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
        train_steps(job, replica, rank, step_log, RayTrainHooks(job))
        rows = {f"rows_epoch{e}": float(n) for e, n in sorted(replica.data.rows_trained.items())}
        figures = every_rank({**replica.held_bytes(), "epoch": float(replica.data.epoch), **rows})
        if step_log:  # what each rank held at its peak, and how many rows it trained on per epoch
            step_log.log(figures, replica.step)
    finally:
        if step_log:
            step_log.close()


class RayTrainHooks:
    """`pipeline.train.loop.StepHooks` on Ray Train: checkpoints reported to it, step metrics as live Ray metrics."""

    def __init__(self, job: TrainJob):
        self.job = job
        self._bar: Any = None  # rank 0's progress bar over the steps, on the driver's terminal
        self._shown = 0

    def checkpoint(self, replica: Replica, metrics: dict[str, float]) -> None:
        """Save the replica's state and report it to Ray Train (a barrier across workers)."""
        import ray.train

        step = replica.step
        with tempfile.TemporaryDirectory() as d:
            replica.save(Path(d))
            ray.train.report(
                {"step": step, "loss": metrics["loss"], "resumed_from_step": replica.resumed_from},
                checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=f"step_{step:06d}",
            )

    def advance(self, step: int) -> None:
        """Move the stage's progress bar (Ray's `tqdm_ray`, drawn by the driver) to `step`; closed at the last."""
        from ray.experimental.tqdm_ray import tqdm

        if self._bar is None:
            self._bar = tqdm(total=self.job.train.max_steps, desc="train")
        self._bar.update(step - self._shown)
        self._shown = step
        if step >= self.job.train.max_steps:
            self._bar.close()

    def record(self, replica: Replica, metrics: dict[str, float]) -> None:
        """Rank 0's live Ray metrics of a step (loss, throughput, the layer x expert load of the router) and its
        progress bar."""
        from pipeline.metrics import record

        self.advance(replica.step)

        tags = {"run": self.job.parent_run_id, "stage": "train"}
        record("moeforge_train_step", replica.step, **tags)
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
            # a worker group that cannot start (workers the cluster has no room for) is a controller failure, which
            # Ray Train retries without limit by default: bounded like worker failures, the stage fails after
            # (max_failures + 1) x RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) instead of waiting forever
            failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": _worker_env()},
        ),
    )
    try:
        return trainer.fit()
    except Exception as e:
        named = named_start_failure(e, cfg.num_workers, resources, cfg.max_failures + 1)
        if named is e:
            raise
        raise named from e


class WorkerGroupNotStarted(RuntimeError):
    """The training workers could not be placed on the cluster within Ray Train's start timeout, every try."""


def named_start_failure(
    e: Exception,
    workers: int,
    resources: dict[str, float],
    tries: int,
    knobs: str = "train.num_workers or train.cpus_per_worker",
) -> Exception:
    """`e`, or where it is Ray Train's worker group start timeout, a `WorkerGroupNotStarted` that says what the
    workers asked for and what the cluster has free."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError  # what a controller failure was
    from ray.train.v2.api.exceptions import ControllerError

    from actors.pool import free_resources_text, resources_text

    if not (isinstance(e, ControllerError) and isinstance(e.controller_failure, WorkerGroupStartupTimeoutError)):
        return e
    return WorkerGroupNotStarted(
        f"{workers} Ray Train workers of {resources_text(resources)} each could not start in {tries} tries of "
        f"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; the cluster has free: {free_resources_text()} (lower {knobs}, or "
        "add nodes)"
    )


def _worker_env() -> dict[str, str]:
    """Environment the workers need from the driver's (the package path when run from a checkout)."""
    return {k: os.environ[k] for k in ("PYTHONPATH", "MOEFORGE_CACHE_DIR") if k in os.environ}
