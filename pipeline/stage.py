"""What a stage is, and the context its work runs in.

A stage declares the artifacts it consumes and produces and the config sections it reads; its identity for the
cache is (code version, stage version, that config slice, its input hashes). `Stage.run(ctx)` executes inside a
Ray task (see `runner.py`), never in the driver: it reads verified inputs from `ctx`, fans work out to actors,
fills `ctx.output_dir(name)` and logs metrics; the runner commits and uploads the outputs only after `run`
returns, so a stage that raises leaves nothing committed.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from filelock import FileLock, Timeout

from pipeline import artifacts
from pipeline.artifacts import ArtifactError, ArtifactRef, ArtifactSpec
from pipeline.config import (
    ConvertConfig,
    DataConfig,
    DistillConfig,
    EvaluateConfig,
    GenerateConfig,
    JobConfig,
    ModelConfig,
    MoeforgeConfig,
    RayConfig,
    RefineConfig,
    RegistryConfig,
    ServeConfig,
    TeacherConfig,
    TrackingConfig,
    TrainConfig,
)
from pipeline.redaction import quiet_mlflow_links

log = logging.getLogger(__name__)


class Stage:
    """Base class of pipeline stages. Subclasses set the class attributes and implement `run`.

    Attributes:
        name: unique stage name, also the name of its MLflow run.
        inputs: names of artifacts produced by upstream stages.
        outputs: specs of the artifacts this stage produces.
        config_sections: the config sections it reads (its slice: params of its run, part of its cache key).
        version: bump when the stage's behaviour changes in a way its config and code version do not capture.
        key_metrics: metrics `moeforge status` shows for it.
        cacheable: False for stages whose effect is outside their outputs (deploying `serve`): always run.
        passthrough: (output, input) pairs: when the stage is off (`enabled` false), that output is that input as it is
            (`refine` off: the `student` downstream is the `trained_student`), so the stages after it still run.
    """

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[ArtifactSpec, ...]] = ()
    config_sections: ClassVar[tuple[str, ...]] = ()
    version: ClassVar[str] = "1"
    key_metrics: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    cacheable: ClassVar[bool] = True
    passthrough: ClassVar[tuple[tuple[str, str], ...]] = ()

    def enabled(self, config: MoeforgeConfig) -> bool:
        """Optional stages (e.g. `serve`) say here whether this run includes them."""
        return True

    def run(self, ctx: StageContext) -> None:
        raise NotImplementedError(f"stage {type(self).__name__} does not implement run()")

    def output_spec(self, name: str) -> ArtifactSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(f"stage {self.name!r} declares no output {name!r}")


class ConfigView:
    """The config as a stage sees it: only the sections it declared, so its cache key covers all it reads. Each
    section is a typed property, so the type checker checks every stage's config access too."""

    def __init__(self, config: MoeforgeConfig, sections: tuple[str, ...], stage: str):
        self._config, self._sections, self._stage = config, sections, stage

    def _section(self, section: str) -> Any:
        if section not in self._sections:
            raise AttributeError(
                f"stage {self._stage!r} reads config section {section!r} but does not declare it in "
                f"config_sections {self._sections}: it would not be part of its cache key"
            )
        return getattr(self._config, section)

    @property
    def teacher(self) -> TeacherConfig:
        return self._section("teacher")

    @property
    def data(self) -> DataConfig:
        return self._section("data")

    @property
    def generate(self) -> GenerateConfig:
        return self._section("generate")

    @property
    def distill(self) -> DistillConfig:
        return self._section("distill")

    @property
    def convert(self) -> ConvertConfig:
        return self._section("convert")

    @property
    def model(self) -> ModelConfig:
        return self._section("model")

    @property
    def train(self) -> TrainConfig:
        return self._section("train")

    @property
    def refine(self) -> RefineConfig:
        return self._section("refine")

    @property
    def evaluate(self) -> EvaluateConfig:
        return self._section("evaluate")

    @property
    def registry(self) -> RegistryConfig:
        return self._section("registry")

    @property
    def serve(self) -> ServeConfig:
        return self._section("serve")

    @property
    def ray(self) -> RayConfig:
        return self._section("ray")

    @property
    def job(self) -> JobConfig:
        return self._section("job")

    @property
    def tracking(self) -> TrackingConfig:
        return self._section("tracking")


@dataclass
class StageCall:
    """Everything a Ray task needs to run one stage (picklable)."""

    stage: Stage
    config: MoeforgeConfig
    run_id: str
    tracking_uri: str
    inputs: dict[str, ArtifactRef]
    workdir: str
    key: str
    parent_run_id: str = ""  # the pipeline run: a tag of this stage's live metrics


class StageContext:
    """The API a stage's `run` uses: inputs, outputs, resume space, metrics, progress."""

    def __init__(self, call: StageCall):
        from mlflow import MlflowClient

        quiet_mlflow_links()  # this worker process ends runs too (log_student): no credentials in its output
        self.call = call
        self.stage = call.stage
        self.run_id = call.run_id
        self.config = ConfigView(call.config, call.stage.config_sections, call.stage.name)
        self.client = MlflowClient(call.tracking_uri)
        self.workdir = Path(call.workdir)
        self._staging = self.workdir / "staging" / f"{call.stage.name}-{uuid.uuid4().hex[:8]}"
        # Survives a failed attempt (same cache key), so a stage may continue from its own partial work. Two runs
        # of one stage with the same key (two drivers on one workdir) would share it, and the first to finish would
        # delete it under the other: an OS file lock (released by the kernel if this process dies) makes the
        # second wait for the first to finish, then start from a clean resume space.
        self.resume_dir = self.workdir / "resume" / f"{call.stage.name}-{call.key[:16]}"
        self.resume_dir.parent.mkdir(parents=True, exist_ok=True)
        self._resume_lock = FileLock(f"{self.resume_dir}.lock", thread_local=False)
        try:
            self._resume_lock.acquire(timeout=0)
        except Timeout:
            log.warning(
                "stage %s: another run holds %s (same stage, same cache key); waiting for it to finish",
                call.stage.name,
                self.resume_dir,
            )
            self._resume_lock.acquire()
        self.resume_dir.mkdir(parents=True, exist_ok=True)

    @property
    def scheduling_strategy(self) -> str:
        """Ray scheduling strategy of this stage's actor pools (`ray.actor_placement`: where, not what, so it is
        not part of the stage's config slice or cache key)."""
        return self.call.config.ray.scheduling_strategy

    # ------------------------------------------------------------------------------------------------ inputs

    def input_path(self, name: str) -> Path:
        """A local, verified copy of input artifact `name` (read in place when the store is local)."""
        if name not in self.call.inputs:
            raise KeyError(f"stage {self.stage.name!r} has no input {name!r}; it declares {self.stage.inputs}")
        return artifacts.fetch(self.call.inputs[name], self.call.tracking_uri, self.workdir)

    def read_table(self, name: str, spec: ArtifactSpec) -> pa.Table:
        ref = self.call.inputs[name]
        return artifacts.read_table(self.input_path(name), spec, ref.hash)

    # ------------------------------------------------------------------------------------------------ outputs

    def output_dir(self, name: str) -> Path:
        """The staging folder to fill with output `name`; committed by the runner after `run` returns."""
        self.stage.output_spec(name)
        path = self._staging / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_table(self, name: str, table: pa.Table, part: str = "data") -> Path:
        """Write a Parquet part of dataset output `name` (checked against its declared schema)."""
        path = self.output_dir(name) / f"{part}.parquet"
        artifacts.write_table(path, table, self.stage.output_spec(name))
        return path

    def commit_outputs(self) -> dict[str, ArtifactRef]:
        """Validate, hash and upload every declared output; all must be present or none is uploaded."""
        missing = [s.name for s in self.stage.outputs if not (self._staging / s.name).is_dir()]
        if missing:
            raise ArtifactError(f"stage {self.stage.name!r} did not write its declared outputs: {', '.join(missing)}")
        hashes = {s.name: artifacts.commit(self._staging / s.name, s) for s in self.stage.outputs}
        base = self.client.get_run(self.run_id).info.artifact_uri.rstrip("/")
        refs = {}
        for spec in self.stage.outputs:
            self.client.log_artifacts(self.run_id, str(self._staging / spec.name), f"outputs/{spec.name}")
            refs[spec.name] = ArtifactRef(spec.name, f"{base}/outputs/{spec.name}", hashes[spec.name], self.run_id)
            log.info("stage %s: committed %s (content hash %s)", self.stage.name, spec.name, hashes[spec.name][:12])
        return refs

    def cleanup(self, succeeded: bool) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)
        try:
            if succeeded:
                shutil.rmtree(self.resume_dir, ignore_errors=True)
        finally:
            self._resume_lock.release()

    # ------------------------------------------------------------------------------------------------ tracking

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def record(self, metric: str, value: float, **tags: object) -> None:
        """A live metric on Ray's Prometheus endpoint (`pipeline/metrics.py`), tagged with this run and stage."""
        from pipeline.metrics import record

        record(metric, value, run=self.call.parent_run_id, stage=self.stage.name, **tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A side artifact of the run (a table, a plot), not a stage output."""
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def progress(self, iterable: Iterable | None = None, total: int | None = None, desc: str | None = None) -> Progress:
        """A progress bar that Ray relays to the driver's terminal, also kept on the run as `progress.*` metrics.

        Iterate over it (wrapping `iterable`) or call `update(n)`. The metrics (`progress.done`, `progress.total`,
        at most one write per `Progress.every_s`) are what `moeforge dashboard` shows for a running stage.
        """
        if total is None and iterable is not None:
            iterable = list(iterable)
            total = len(iterable)
        return Progress(self, total or 0, desc or self.stage.name, iterable)


class Progress:
    """A `tqdm_ray` bar whose position is also logged to the stage's MLflow run (throttled)."""

    every_s = 2.0

    def __init__(self, ctx: StageContext, total: int, desc: str, iterable: Iterable | None = None):
        from ray.experimental.tqdm_ray import tqdm

        self._ctx, self.total, self.done, self._iterable = ctx, total, 0, iterable
        self._bar = tqdm(total=total, desc=desc)
        self._logged_at = 0.0
        self._log()

    def _log(self) -> None:
        self._logged_at = time.monotonic()
        # step 0 throughout: MLflow's latest value is then the newest write (a stage may run several bars)
        self._ctx.log_metrics({"progress.done": self.done, "progress.total": self.total})

    def __iter__(self):
        for item in self._iterable or ():
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        if time.monotonic() - self._logged_at >= self.every_s:
            self._log()

    def set_description(self, desc: str) -> None:
        self._bar.set_description(desc)

    def close(self) -> None:
        self._log()
        self._bar.close()
