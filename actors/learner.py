"""The learner role of `refine`: one Ray Train worker group for the whole stage, every worker one `PolicyLearner`
(`pipeline/train/policy_learner.py`) that stays in memory from one iteration to the next.

Starting a group, building the model and loading the state took most of an iteration when done per iteration. As in
verl's actor worker group, the group starts once (while the first rollouts run) and the stage hands it one job per
iteration through a channel actor: the graded, teacher-scored samples and the refs of the starting state. Each rank
trains on every `world`-th sample, DDP over gloo (CPU) or NCCL (GPU) keeps the ranks equal, and rank 0 hands back
the new state (weights, AdamW's) through the object store. A rank reuses its in-memory learner when it finished the
previous iteration itself, and otherwise builds one from the job's state, so a worker group that Ray Train restarted
after a worker died (`refine.max_failures` restarts over the stage) redoes the pending iteration from its start:
nothing is applied twice, since an update only exists once the stage has taken its result.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from actors.object_store import CarriedState, get_tensors, put_tensors
from actors.trainer import named_start_failure
from pipeline.config import RefineConfig
from pipeline.model import ModelConfig
from pipeline.train.loop import return_large_frees_to_the_os
from pipeline.train.policy_learner import LearnerMetrics

if TYPE_CHECKING:
    from ray import ObjectRef

log = logging.getLogger(__name__)


@dataclass
class LearnerJob:
    """One iteration's update (picklable; Ray hands the refs inside on as refs): `actors/object_store.put_tensors`
    refs of the student's state dict at the iteration's start (the rollout actors' too), AdamW's state carried
    from the previous iteration (None at the first) and the starting student (None: no KL term), and a ref of the
    iteration's list of `PolicySample`s."""

    iteration: int
    weights: ObjectRef  # ObjectRef[dict[str, np.ndarray]]: the student's state dict
    optimizer: ObjectRef | None  # AdamW's state dict
    reference: ObjectRef | None  # the starting student's state dict
    samples: ObjectRef  # ObjectRef[list[PolicySample]]


@dataclass
class LearnerSetup:
    """What every worker of the group is started with (picklable)."""

    model: ModelConfig
    refine: RefineConfig
    top_k: int
    channel: Any  # the `LearnerChannel` actor's handle


class LearnerChannel:
    """Between the stage and its learner workers: the pending job, and the results rank 0 hands back.

    A job stays pending until its result is in, so the workers of a restarted group take it again. Run as an async
    actor: the workers' and the stage's waits are coroutines polling its state, none of them blocking another."""

    _POLL_S = 0.02

    def __init__(self):
        self.job: LearnerJob | None = None
        self.submitted = 0  # how many jobs the stage submitted: a job submitted again is new to every rank
        self.taken: set[int] = set()  # ranks working on the pending job
        self.results: dict[int, tuple[LearnerMetrics, list]] = {}
        self.stopped = False

    def submit(self, job: LearnerJob) -> None:
        self.job, self.taken = job, set()
        self.submitted += 1
        self.results.pop(job.iteration, None)

    async def next_job(self, rank: int, seen: int) -> tuple[int, LearnerJob] | None:
        """(its number, the pending job), once one was submitted after the `seen`-th; None once the stage stopped."""
        while not self.stopped:
            if self.job is not None and self.submitted > seen:
                self.taken.add(rank)
                return self.submitted, self.job
            await asyncio.sleep(self._POLL_S)
        return None

    def put_result(self, iteration: int, metrics: LearnerMetrics, state: list) -> None:
        self.results[iteration] = (metrics, state)
        if self.job is not None and self.job.iteration == iteration:
            self.job, self.taken = None, set()

    async def result(self, iteration: int, timeout_s: float) -> tuple[LearnerMetrics, list] | None:
        """The result of `iteration` (handed over once: the channel drops its ref), or None after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while iteration not in self.results and time.monotonic() < deadline:
            await asyncio.sleep(self._POLL_S)
        return self.results.pop(iteration, None)

    def status(self) -> dict[str, Any]:
        """What the group is doing, for dashboards and tests: the pending iteration and the ranks updating on it."""
        return {"iteration": None if self.job is None else self.job.iteration, "updating": sorted(self.taken)}

    def stop(self) -> None:
        self.stopped = True


def learner_loop(config: dict[str, Any]) -> None:
    """The body of every learner worker: one job after another until the stage stops the channel;
    `config["setup"]` is the `LearnerSetup`."""
    import ray
    import ray.train
    import ray.train.torch

    from pipeline.train.policy_learner import PolicyLearner

    setup: LearnerSetup = config["setup"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(setup.refine.num_cpus_per_actor)))
    return_large_frees_to_the_os()  # what loading and the updates free goes back, not into a heap kept at its peak
    learner, done, seen = None, None, 0  # the in-memory learner, the iteration it finished last, the last job taken
    while (taken := ray.get(setup.channel.next_job.remote(rank, seen))) is not None:
        seen, job = taken
        if learner is None or done != job.iteration - 1:
            del learner  # the previous model and optimizer go before the next are built
            # weights and reference are read-only views of the object store's copy (load_state_dict copies from
            # them); AdamW's state becomes the optimizer's own tensors
            learner = PolicyLearner(
                setup.model,
                setup.refine,
                get_tensors(job.weights),
                get_tensors(job.optimizer, writable=True) if job.optimizer is not None else None,
                get_tensors(job.reference) if job.reference is not None else None,
                rank,
                world,
                device,
            )
        torch.manual_seed(setup.refine.seed + job.iteration)
        samples = ray.get(job.samples)[rank::world]
        metrics = learner.update(samples, setup.top_k)
        done = job.iteration
        if rank == 0:
            # in a list: a ref passed on its own would be resolved into the channel's memory
            ray.get(setup.channel.put_result.remote(job.iteration, metrics, [put_tensors(learner.state())]))


class LearnerGroup:
    """`refine.num_workers` Ray Train workers that update the student once per `update` call, started on entry and
    stopped on exit (a context manager). `fit` runs in a thread of the stage's process; its error, once the
    worker group has failed `refine.max_failures + 1` times, is raised by the `update` waiting on it."""

    _WAIT_S = 2.0  # how often a waiting `update` checks that the worker group is still running

    def __init__(self, model: ModelConfig, cfg: RefineConfig, top_k: int, run_name: str, storage_path: str,
                 channel_name: str | None = None):  # fmt: skip
        self.model, self.cfg, self.top_k = model, cfg, top_k
        self.run_name, self.storage_path, self.channel_name = run_name, storage_path, channel_name
        self.channel: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> LearnerGroup:
        import ray
        from ray.train.torch import TorchConfig
        from ray.train.v2.api.config import FailureConfig, RunConfig, ScalingConfig  # V2, named: see actors/trainer.py
        from ray.train.v2.torch.torch_trainer import TorchTrainer

        cfg = self.cfg
        options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 64}
        if self.channel_name:
            options["name"] = self.channel_name
        self.channel = ray.remote(LearnerChannel).options(**options).remote()
        use_gpu = cfg.use_gpu
        resources = {"CPU": cfg.num_cpus_per_actor, **({"GPU": 1} if use_gpu else {})}
        trainer = TorchTrainer(
            learner_loop,
            train_loop_config={"setup": LearnerSetup(self.model, cfg, self.top_k, self.channel)},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=self.run_name,
                storage_path=self.storage_path,
                # a group that cannot start is bounded too (see actors/trainer.py's fit)
                failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=cfg.max_failures),
                worker_runtime_env={"env_vars": {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}},
            ),
        )

        def fit() -> None:
            try:
                trainer.fit()
            except Exception as e:  # noqa: BLE001 - any failure is handed to the waiting `update`, which raises it
                knobs = "refine.num_workers or refine.num_cpus_per_actor"
                self._error = named_start_failure(e, cfg.num_workers, resources, cfg.max_failures + 1, knobs)

        self._thread = threading.Thread(target=fit, name=f"{self.run_name}.fit", daemon=True)
        self._thread.start()
        return self

    def update(
        self, iteration: int, carried: CarriedState, reference: ObjectRef | None, samples: list
    ) -> LearnerMetrics:
        """Iteration `iteration`'s update on `samples` (`PolicySample`s) from the `carried` state, which must be
        published (in the object store); `carried` then holds the new state, this process's own tensors."""
        import ray
        from ray.exceptions import ObjectLostError, OwnerDiedError

        if carried.weights is None:
            raise RuntimeError("the carried state must be published before the update")
        job = LearnerJob(iteration, carried.weights, carried.optimizer, reference, ray.put(samples))
        ray.get(self.channel.submit.remote(job))
        while True:
            got = ray.get(self.channel.result.remote(job.iteration, self._WAIT_S))
            if got is None:
                self._check_running()
                continue
            metrics, (state_ref,) = got
            try:
                # copied out of the object store: the worker that put it may die before the next iteration
                carried.replace(get_tensors(state_ref, writable=True))
                return metrics
            except (ObjectLostError, OwnerDiedError) as e:  # rank 0 died after handing it over: redo the update
                log.warning("refine's learner lost iteration %d's result (%s); updating again", job.iteration, e)
                ray.get(self.channel.submit.remote(job))

    def _check_running(self) -> None:
        assert self._thread is not None
        if self._thread.is_alive():
            return
        cause = self._error or RuntimeError("the worker group stopped")
        raise RuntimeError(f"refine's learner failed after {self.cfg.max_failures} restart(s): {cause}") from cause

    def __exit__(self, *exc) -> None:
        import ray

        if self.channel is not None:
            ray.get(self.channel.stop.remote())
        if self._thread is not None:
            self._thread.join(timeout=120)
            if self._thread.is_alive():
                log.warning("refine's learner group %s did not stop within 120 s", self.run_name)
        if self.channel is not None:
            ray.kill(self.channel)
