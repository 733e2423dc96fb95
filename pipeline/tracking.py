"""MLflow tracking: the run tree, lineage tags and the stage cache.

A pipeline run is one MLflow parent run; each stage is a nested run (tag `mlflow.parentRunId`) carrying its
config slice as params and these tags:

    moeforge.stage, moeforge.stage_key        which stage, and its cache identity
    moeforge.code_version, moeforge.config_hash   code and config-slice identity
    moeforge.input.<name>.{uri,hash}          what it read
    moeforge.output.<name>.{uri,hash}         what it committed (set just before the run is marked FINISHED)
    moeforge.cache_hit, moeforge.cached_from  whether it was reused, and from which run

The cache is a query: a FINISHED stage run with the same `moeforge.stage_key`. Only the tracking server is
shared state, so any driver on any node sees the same cache.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunTag
from mlflow.exceptions import MlflowException

from pipeline.artifacts import ArtifactRef
from pipeline.config import MoeforgeConfig, TrackingConfig, config_hash, flatten
from pipeline.redaction import quiet_mlflow_links, redact, redact_uri
from pipeline.stage import Stage

log = logging.getLogger(__name__)

P = "moeforge."
PARENT = "mlflow.parentRunId"
_BATCH = 100  # MLflow's limit of params per log_batch call


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """cfg.uri, else $MLFLOW_TRACKING_URI, else a SQLite file in the workdir."""
    if cfg.uri:
        return cfg.uri
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'mlflow.db'}"


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (`start_run`, `log_model`, `register_model`) against `uri` for this block only.

    `mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI for the rest of the process (and every process it
    starts), which would silently redirect every later default to this store; the previous value is put back.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None clears the process-wide URI and its variable
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def ray_job_submission_id() -> str | None:
    """The submission id of the Ray job this driver runs as (`ray job submit`, `moeforge submit`), if any."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run, when the store is a tracking server (the UI it serves)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{(redact_uri(tracking_uri) or '').rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


@dataclass(frozen=True)
class CachedStage:
    run_id: str  # the run that produced the outputs
    outputs: dict[str, ArtifactRef]


def _q(value: str) -> str:
    return value.replace("'", "\\'")


class Tracker:
    """The pipeline's view of MLflow (tracking server or local SQLite), through `MlflowClient` only."""

    def __init__(self, cfg: TrackingConfig):
        self.cfg = cfg
        self.workdir = Path(cfg.workdir).resolve()
        self.uri = resolve_tracking_uri(cfg)
        self.shown_uri = redact_uri(self.uri)  # what output and pages show: the store without its credentials
        quiet_mlflow_links()
        self.client = MlflowClient(self.uri)
        self.experiment_id = self._ensure_experiment()

    def _ensure_experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        location = self.cfg.artifact_location
        if location is None and self.uri.startswith("sqlite:") and self.uri.endswith(str(self.workdir / "mlflow.db")):
            location = (self.workdir / "mlartifacts").as_uri()  # the embedded default: everything in the workdir
        try:
            return self.client.create_experiment(self.cfg.experiment, artifact_location=location)
        except MlflowException:  # created concurrently by another driver
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    # ------------------------------------------------------------------------------------------------ writes

    def _log(self, run_id: str, params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
        items = list((params or {}).items())
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + _BATCH]])
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def start_pipeline(self, cfg: MoeforgeConfig, code_version: str, stages: list[str]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={
                P + "kind": "pipeline",
                P + "config_name": cfg.name,
                P + "config_hash": cfg.hash(),
                P + "code_version": code_version,
                P + "stages": ",".join(stages),
                P + "host": socket.gethostname(),
                P + "pid": str(os.getpid()),
                **({P + "ray_job": job} if (job := ray_job_submission_id()) else {}),
            },
        )
        run_id = run.info.run_id
        self._log(run_id, params=flatten(redact(cfg.model_dump(mode="json"))))
        self.client.log_text(run_id, cfg.to_yaml(), "config.yaml")
        return run_id

    def start_stage(
        self,
        parent_id: str,
        stage: Stage,
        key: str,
        config_slice: dict[str, Any],
        inputs: dict[str, ArtifactRef],
        code_version: str,
    ) -> str:
        tags = {
            PARENT: parent_id,
            P + "kind": "stage",
            P + "stage": stage.name,
            P + "stage_version": stage.version,
            P + "stage_key": key,
            P + "code_version": code_version,
            P + "config_hash": config_hash(config_slice),
            P + "cache_hit": "false",
        }
        for name, ref in inputs.items():
            tags[f"{P}input.{name}.uri"] = ref.uri
            tags[f"{P}input.{name}.hash"] = ref.hash
        run = self.client.create_run(self.experiment_id, run_name=stage.name, tags=tags)
        self._log(run.info.run_id, params=flatten(redact(config_slice)))
        return run.info.run_id

    def finish_stage(self, run_id: str, outputs: dict[str, ArtifactRef]) -> None:
        """Record outputs, then mark FINISHED: this order makes the run a valid cache entry only once complete."""
        tags = {}
        for name, ref in outputs.items():
            tags[f"{P}output.{name}.uri"] = ref.uri
            tags[f"{P}output.{name}.hash"] = ref.hash
        self._log(run_id, tags=tags)
        self.client.set_terminated(run_id, "FINISHED")

    def record_cache_hit(self, run_id: str, cached: CachedStage) -> None:
        self._log(run_id, tags={P + "cache_hit": "true", P + "cached_from": cached.run_id})
        self.finish_stage(run_id, cached.outputs)

    def fail(self, run_id: str, error: BaseException | str, status: str = "FAILED") -> None:
        message = str(error) or type(error).__name__
        self._log(run_id, tags={P + "error": message[:4000]})
        self.client.set_terminated(run_id, status)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    # ------------------------------------------------------------------------------------------------ queries

    def find_cached(self, stage: Stage, key: str) -> CachedStage | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{P}stage_key` = '{_q(key)}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            return None
        tags = runs[0].data.tags
        outputs = {}
        for spec in stage.outputs:
            uri, digest = tags.get(f"{P}output.{spec.name}.uri"), tags.get(f"{P}output.{spec.name}.hash")
            if not uri or not digest:
                return None
            outputs[spec.name] = ArtifactRef(spec.name, uri, digest, tags.get(P + "cached_from", runs[0].info.run_id))
        return CachedStage(tags.get(P + "cached_from", runs[0].info.run_id), outputs)

    def pipeline_runs(self, max_results: int = 20) -> list[Run]:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{P}kind` = 'pipeline'",
            order_by=["attributes.start_time DESC"],
            max_results=max_results,
        )

    def runs_of_job(self, submission_id: str) -> list[Run]:
        """Pipeline runs started by a Ray job."""
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{P}kind` = 'pipeline' and tags.`{P}ray_job` = '{_q(submission_id)}'",
            order_by=["attributes.start_time DESC"],
        )

    def stage_runs(self, parent_id: str) -> list[Run]:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT}` = '{_q(parent_id)}'",
            order_by=["attributes.start_time ASC"],
        )

    def reap_dead_drivers(self) -> list[str]:
        """Mark RUNNING pipeline runs whose driver process on this host is gone as KILLED (and their stages).

        A driver that died (OOM, kill -9, power loss) cannot close its own runs; without this `moeforge status`
        would show them running forever. Runs of drivers on other hosts are left alone.
        """
        host = socket.gethostname()
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{P}kind` = 'pipeline' and tags.`{P}host` = '{_q(host)}' "
            "and attributes.status = 'RUNNING'",
        )
        reaped = []
        for run in runs:
            pid = int(run.data.tags.get(P + "pid", "0") or 0)
            if pid and psutil.pid_exists(pid):
                continue
            for child in self.stage_runs(run.info.run_id):
                if child.info.status == "RUNNING":
                    self.fail(child.info.run_id, "driver process died", "KILLED")
            self.fail(run.info.run_id, "driver process died", "KILLED")
            reaped.append(run.info.run_id)
            log.warning("pipeline run %s: its driver (pid %s) is gone; marked KILLED", run.info.run_id, pid)
        return reaped
