"""The learner role of `refine` on Ray Train: every worker runs one `PolicyLearner` (`pipeline/train/policy_learner.py`)
for one iteration.

The batch (the graded, teacher-scored samples) and the starting state (weights, AdamW's state, the starting
student for the KL term) reach the workers through the object store; each rank trains on every `world`-th sample,
DDP over gloo (CPU) or NCCL (GPU) keeps the ranks equal, and rank 0 reports the new state as the run's one
checkpoint. A worker that dies restarts the worker group (`refine.max_failures` times), which redoes the
iteration's update from its start: nothing is applied twice, since the update only exists once reported. A run
of the same name that already reported (its driver died after the update) returns that checkpoint without
training again.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.object_store import get_tensors
from actors.trainer import return_large_frees_to_the_os
from pipeline.config import RefineConfig
from pipeline.model import ModelConfig

_STATE = "learner_state.pt"
_METRICS = "metrics.json"


@dataclass
class LearnerJob:
    """What every learner worker needs (picklable): refs into the object store, the configs, the iteration."""

    model: ModelConfig
    refine: RefineConfig
    iteration: int
    # `actors/object_store.put_tensors` refs: the student's state dict at the iteration's start (the rollout
    # actors' too), AdamW's state carried from the previous iteration (or None), the starting student (or None)
    weights: Any
    optimizer: Any
    reference: Any
    samples: Any  # ObjectRef to the iteration's list of `PolicySample`s
    top_k: int


def learner_loop(job: LearnerJob) -> None:
    """The body of every learner worker."""
    import ray
    import ray.train
    import ray.train.torch

    from pipeline.train.policy_learner import PolicyLearner

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if (done := ray.train.get_checkpoint()) is not None:  # this iteration's update was reported already
        with done.as_directory() as d:
            metrics = json.loads((Path(d) / _METRICS).read_text())
        ray.train.report(metrics, checkpoint=done if rank == 0 else None)
        return
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.refine.num_cpus_per_actor)))
    torch.manual_seed(job.refine.seed + job.iteration)
    return_large_frees_to_the_os()  # what loading and the update free goes back, not into a heap kept at its peak
    # weights and reference are read-only views of the object store's copy (load_state_dict copies from them);
    # AdamW's state becomes the optimizer's own tensors
    learner = PolicyLearner(
        job.model,
        job.refine,
        get_tensors(job.weights),
        get_tensors(job.optimizer, writable=True) if job.optimizer is not None else None,
        get_tensors(job.reference) if job.reference is not None else None,
        rank,
        world,
        device,
    )
    samples = ray.get(job.samples)[rank::world]
    metrics = learner.update(samples, job.top_k)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            torch.save(learner.state(), Path(d) / _STATE)
            (Path(d) / _METRICS).write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"iteration_{job.iteration:04d}")


def learn(job: LearnerJob, run_name: str, storage_path: str) -> tuple[dict[str, float], dict[str, Any]]:
    """One iteration's update on `refine.num_workers` Ray Train workers; returns (metrics, the new state)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = job.refine
    use_gpu = cfg.use_gpu
    resources = {"CPU": cfg.num_cpus_per_actor, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        learner_loop,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            worker_runtime_env={"env_vars": {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}},
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"refine's learner failed after {cfg.max_failures} restart(s): {result.error}")
    if result.checkpoint is None:
        raise RuntimeError(f"refine's learner run {run_name} under {storage_path} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        metrics = json.loads((Path(d) / _METRICS).read_text())
        state = torch.load(Path(d) / _STATE, weights_only=True)
    return metrics, state
