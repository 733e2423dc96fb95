"""The driver: walks the stage DAG, reuses cached stages, runs the rest as Ray tasks, records it all in MLflow.

The driver itself does no stage work. For each stage it computes the cache key
    sha256(code version, stage name + version, config slice, input content hashes)
and either records a cache hit (a nested run pointing at the run that produced the outputs) or starts a nested
run and executes `Stage.run` in a Ray task, which commits and uploads the outputs before returning their refs.
A changed config slice changes that stage's key, which changes its outputs' hashes, which changes every
downstream key: exactly the affected stages re-run, nothing upstream.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.artifacts import ArtifactRef
from pipeline.config import MoeforgeConfig, RayConfig, config_hash
from pipeline.dag import Dag, DagError
from pipeline.stage import Stage, StageCall, StageContext
from pipeline.tracking import Tracker
from pipeline.version import code_version

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A stage raised; its run is FAILED and nothing it wrote was committed."""

    def __init__(self, stage: str, run_id: str, cause: BaseException):
        self.stage, self.run_id, self.cause = stage, run_id, cause
        super().__init__(f"stage {stage!r} failed (MLflow run {run_id}): {type(cause).__name__}: {cause}")


@dataclass
class StageOutcome:
    name: str
    run_id: str
    cache_hit: bool
    seconds: float
    outputs: dict[str, ArtifactRef]


@dataclass
class PipelineResult:
    run_id: str
    tracking_uri: str
    stages: list[StageOutcome] = field(default_factory=list)

    def __getitem__(self, name: str) -> StageOutcome:
        return next(s for s in self.stages if s.name == name)


def default_stages() -> list[Stage]:
    """The product's DAG: every stage that is built, in declaration order."""
    from pipeline.stages import STAGES

    return [cls() for cls in STAGES]


def stage_key(stage: Stage, config_slice: dict, inputs: dict[str, ArtifactRef], version: str) -> str:
    return config_hash(
        {
            "code_version": version,
            "stage": stage.name,
            "stage_version": stage.version,
            "config": config_slice,
            "inputs": {name: ref.hash for name, ref in sorted(inputs.items())},
        }
    )


def ensure_ray(cfg: RayConfig, on_connect: Callable[[], object] | None = None) -> None:
    """Connect to the cluster in cfg.address / $RAY_ADDRESS, or start a local one; reuse a live connection.

    `on_connect` runs once right after a new connection (the CLI routes the workers' logs there).
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard, namespace=cfg.namespace, log_to_driver=True
        )
    if on_connect is not None:
        on_connect()


def own_cluster_env() -> dict:
    """A stage task's runtime env: `RAY_ADDRESS` set to this run's cluster, inherited by every task and actor the
    stage starts (Ray Train's controller and workers, actor pools).

    Ray code that connects by itself inside a worker (Ray Train's placement-group cleaner, the state API) otherwise
    looks for "the" local cluster, and with a second run's cluster on the same machine it fails ("Found multiple
    active Ray instances") or finds the other one: a killed stage's retry then waited forever on resources that
    were never released."""
    import ray

    return {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}


def execute_stage(call: StageCall) -> dict[str, ArtifactRef]:
    """Body of the Ray task that runs one stage: run, then commit outputs; clean staging either way."""
    ctx = StageContext(call)
    ok = False
    try:
        call.stage.run(ctx)
        refs = ctx.commit_outputs()
        ok = True
        return refs
    finally:
        ctx.cleanup(ok)


def plan(
    dag: Dag,
    cfg: MoeforgeConfig,
    force: Sequence[str] = (),
    from_stage: str | None = None,
    until: str | None = None,
    only: str | None = None,
) -> tuple[list[Stage], set[str], set[str]]:
    """Which stages take part, which must re-run regardless of cache, and which must come from the cache.

    `only` is one stage alone (a stage's job entrypoint): everything upstream of it must come from the cache.
    """
    if only and (from_stage or until):
        raise DagError("--only runs one stage; it does not combine with --from or --until")
    for name in (*force, *(n for n in (from_stage, until, only) if n)):
        dag[name]  # raises DagError naming an unknown stage
    # a stage that is off but passes its input through stays in the plan: the loop hands its input on
    selected = [s for s in dag.order if s.enabled(cfg) or s.passthrough or s.name == only]
    if last := until or only:
        keep = dag.ancestors(last)
        selected = [s for s in selected if s.name in keep]
    rerun = set(force)
    cached_only: set[str] = set()
    if from_stage:
        rerun |= dag.downstream([from_stage])
        cached_only = {s.name for s in selected if s.name not in rerun}
    if only:
        cached_only = {s.name for s in selected if s.name != only}
    return selected, rerun, cached_only


Reporter = Callable[[str, str, dict], None]  # (event, stage name, details)


def run_pipeline(
    cfg: MoeforgeConfig,
    stages: Sequence[Stage] | None = None,
    *,
    force: Sequence[str] = (),
    from_stage: str | None = None,
    until: str | None = None,
    only: str | None = None,
    report: Reporter | None = None,
    on_ray_connect: Callable[[], object] | None = None,
) -> PipelineResult:
    """Run (or resume) a pipeline: one MLflow parent run, one nested run per stage.

    Args:
        cfg: the validated run config.
        stages: the DAG's stages; default: the product's built stages.
        force: stages to re-run even when cached (downstream re-runs if their outputs change).
        from_stage: re-run this stage and everything downstream; upstream must be cached.
        until: stop after this stage (run only it and what it needs).
        only: run this stage alone, its inputs taken from cached upstream runs.
        report: callback for progress events (`cached`, `start`, `done`, `failed`).
        on_ray_connect: called once when this driver connects to Ray (only if a stage has to run).
    """
    import ray

    report = report or (lambda *_: None)
    dag = Dag(default_stages() if stages is None else stages)
    selected, rerun, cached_only = plan(dag, cfg, force, from_stage, until, only)
    tracker = Tracker(cfg.tracking)
    tracker.reap_dead_drivers()
    version = code_version()
    skipped = {s.name for s in selected if not s.enabled(cfg) and s.name != only}
    parent = tracker.start_pipeline(cfg, version, [s.name for s in selected if s.name not in skipped])
    result = PipelineResult(parent, tracker.uri)
    produced: dict[str, ArtifactRef] = {}
    try:
        for stage in selected:
            if stage.name in skipped:
                produced.update({out: produced[source] for out, source in stage.passthrough})
                log.info(
                    "stage %s: off; %s passed on as they are", stage.name, ", ".join(s for _, s in stage.passthrough)
                )
                report("skipped", stage.name, {"passes": dict(stage.passthrough)})
                continue
            inputs = {name: produced[name] for name in stage.inputs}
            config_slice = cfg.slice(stage.config_sections)
            key = stage_key(stage, config_slice, inputs, version)
            run_id = tracker.start_stage(parent, stage, key, config_slice, inputs, version)
            t0 = time.perf_counter()
            cached = None if stage.name in rerun or not stage.cacheable else tracker.find_cached(stage, key)
            if cached is not None:
                tracker.record_cache_hit(run_id, cached)
                log.info("stage %s: cache hit (key %s) from run %s", stage.name, key[:16], cached.run_id)
                outcome = StageOutcome(stage.name, run_id, True, time.perf_counter() - t0, cached.outputs)
                report("cached", stage.name, {"from": cached.run_id})
            elif stage.name in cached_only:
                flag = f"--only {only}" if only else f"--from {from_stage}"
                error = DagError(
                    f"{flag}: upstream stage {stage.name!r} has no finished run with this config and "
                    f"inputs; run the pipeline (or `--until {stage.name}`) without {flag.split()[0]} "
                    "first"
                )
                tracker.fail(run_id, error)
                raise error
            else:
                report("start", stage.name, {"run_id": run_id})
                log.info("stage %s: running as run %s (key %s, code %s)", stage.name, run_id, key[:16], version)
                ensure_ray(cfg.ray, on_ray_connect)
                call = StageCall(stage, cfg, run_id, tracker.uri, inputs, str(tracker.workdir), key, parent)
                # max_calls=1: a fresh worker process per stage. One that ran a stage keeps its heap (1.1 GB after
                # convert; glibc does not give it back), and Ray would reuse it for the next stage
                task = ray.remote(max_calls=1)(execute_stage).options(
                    num_cpus=cfg.ray.stage_num_cpus,
                    name=f"moeforge.{stage.name}",
                    retry_exceptions=False,
                    runtime_env=own_cluster_env(),
                )
                ref = task.remote(call)
                try:
                    outputs = ray.get(ref)
                except KeyboardInterrupt:
                    ray.cancel(ref, force=True)
                    tracker.fail(run_id, "interrupted", "KILLED")
                    raise
                except Exception as e:  # the stage's own error, re-raised with its run id
                    cause = getattr(e, "cause", None) or e
                    tracker.fail(run_id, f"{type(cause).__name__}: {cause}")
                    log.error("stage %s failed (run %s): %s: %s", stage.name, run_id, type(cause).__name__, cause)
                    report("failed", stage.name, {"run_id": run_id, "error": str(cause)})
                    raise StageFailed(stage.name, run_id, cause) from e
                tracker.finish_stage(run_id, outputs)
                outcome = StageOutcome(stage.name, run_id, False, time.perf_counter() - t0, outputs)
                report("done", stage.name, {"run_id": run_id, "seconds": outcome.seconds})
            produced.update(outcome.outputs)
            result.stages.append(outcome)
    except KeyboardInterrupt:
        tracker.fail(parent, "interrupted", "KILLED")
        raise
    except BaseException as e:
        tracker.fail(parent, e)
        raise
    tracker.finish(parent)
    return result
