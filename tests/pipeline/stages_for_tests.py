"""Small stages used only by the orchestrator's tests: real Parquet in, real Parquet out, through real Ray and
MLflow. Each reads one config section, so tests can change one section and see exactly what re-runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.artifacts import ArtifactSpec
from pipeline.stage import Stage, StageContext

NUMBERS = ArtifactSpec("numbers", "dataset", pa.schema([("i", pa.int64()), ("x", pa.int64())]), "0..n-1")
SCALED = ArtifactSpec("scaled", "dataset", pa.schema([("i", pa.int64()), ("x", pa.int64())]), "x * top_k")
SUMMARY = ArtifactSpec("summary", "files", None, "sum as JSON")
POLISHED = ArtifactSpec("polished", "dataset", NUMBERS.schema, "x + 1, or when polish is off the scaled rows")


def _log_call(path: str | None, name: str) -> None:
    """Append the stage name to a file, so tests can count real executions across processes."""
    if path:
        with open(path, "a") as f:
            f.write(name + "\n")


class Numbers(Stage):
    name = "numbers"
    outputs = (NUMBERS,)
    config_sections = ("data",)
    key_metrics = ("rows",)

    def __init__(self, calls: str | None = None):
        self.calls = calls

    def run(self, ctx: StageContext) -> None:
        _log_call(self.calls, self.name)
        n = ctx.config.data.num_train_prompts
        ctx.write_table("numbers", pa.table({"i": pa.array(range(n), pa.int64()), "x": pa.array(range(n), pa.int64())}))
        ctx.log_metrics({"rows": n})


class Scale(Stage):
    """Processes rows one by one, remembering progress in its resume folder so a failed attempt resumes.

    After `fail_after` rows it raises once, or with `hang` stalls (for a test to kill the driver); a marker
    file makes this happen on the first attempt only.
    """

    name = "scale"
    inputs = ("numbers",)
    outputs = (SCALED,)
    config_sections = ("distill",)
    key_metrics = ("rows_done", "resumed_at")

    def __init__(
        self,
        calls: str | None = None,
        fail_after: int | None = None,
        fail_marker: str | None = None,
        hang: bool = False,
    ):
        self.calls, self.fail_after, self.fail_marker, self.hang = calls, fail_after, fail_marker, hang

    def run(self, ctx: StageContext) -> None:
        _log_call(self.calls, self.name)
        table = ctx.read_table("numbers", NUMBERS)
        progress = ctx.resume_dir / "done.jsonl"
        done = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
        ctx.log_metrics({"resumed_at": len(done)})
        k = ctx.config.distill.top_k
        out_dir = ctx.output_dir("scaled")
        (out_dir / "partial.txt").write_text("half-written")  # a half-written output that must never be committed
        with open(progress, "a") as f:
            for row in ctx.progress(table.to_pylist()[len(done) :], desc="scale rows"):
                if self.fail_after is not None and len(done) == self.fail_after and not Path(self.fail_marker).exists():
                    Path(self.fail_marker).touch()
                    if self.hang:
                        time.sleep(600)
                    raise RuntimeError(f"injected failure after {len(done)} rows")
                done.append({"i": row["i"], "x": row["x"] * k})
                f.write(json.dumps(done[-1]) + "\n")
                f.flush()
        (out_dir / "partial.txt").unlink()
        ctx.write_table("scaled", pa.Table.from_pylist(done, schema=SCALED.schema))
        ctx.log_metrics({"rows_done": len(done)})


class Summarize(Stage):
    name = "summarize"
    inputs = ("scaled",)
    outputs = (SUMMARY,)
    config_sections = ("evaluate",)

    def __init__(self, calls: str | None = None):
        self.calls = calls

    def run(self, ctx: StageContext) -> None:
        _log_call(self.calls, self.name)
        total = pc.sum(ctx.read_table(self.inputs[0], SCALED)["x"]).as_py() or 0
        bonus = ctx.config.evaluate.batch_size
        (ctx.output_dir("summary") / "summary.json").write_text(json.dumps({"sum": total, "bonus": bonus}))
        ctx.log_metrics({"sum": total})


class Polish(Stage):
    """An optional stage (on when refine.iterations > 0) that, when off, passes its input on as its output."""

    name = "polish"
    inputs = ("scaled",)
    outputs = (POLISHED,)
    passthrough = (("polished", "scaled"),)
    config_sections = ("refine",)

    def __init__(self, calls: str | None = None):
        self.calls = calls

    def enabled(self, config) -> bool:
        return config.refine.iterations > 0

    def run(self, ctx: StageContext) -> None:
        _log_call(self.calls, self.name)
        table = ctx.read_table("scaled", SCALED)
        ctx.write_table("polished", table.set_column(1, "x", pc.add(table["x"], 1)))


class SummarizePolished(Summarize):
    inputs = ("polished",)


class ReadsUndeclared(Stage):
    """Reads a section it did not declare: must be refused, since the cache key would not cover it."""

    name = "sneaky"
    outputs = (ArtifactSpec("sneaky", "files"),)
    config_sections = ("data",)

    def run(self, ctx: StageContext) -> None:
        ctx.config.train.max_steps  # noqa: B018


def chain(calls: str | None = None, **scale_kwargs) -> list[Stage]:
    return [Numbers(calls), Scale(calls, **scale_kwargs), Summarize(calls)]


class ClusterProbe(Stage):
    """Asks, from an actor the stage starts (as Ray Train's controller is), Ray's state API which nodes its cluster
    has: Ray code inside workers that connects by itself must find the run's own cluster."""

    name = "probe"
    outputs = (ArtifactSpec("cluster", "files", None, "the node ids the state API saw"),)
    config_sections = ("data",)

    def run(self, ctx: StageContext) -> None:
        import ray

        @ray.remote(num_cpus=0)
        class Child:
            def nodes(self) -> list[str]:
                from ray.util.state import list_nodes

                return sorted(n.node_id for n in list_nodes())

        child = Child.remote()
        out = ctx.output_dir("cluster")
        (out / "nodes.json").write_text(json.dumps(ray.get(child.nodes.remote())))
        (out / "pid").write_text(str(os.getpid()))


class SecondProbe(ClusterProbe):
    name = "probe2"
    outputs = (ArtifactSpec("cluster2", "files", None, "the node ids the state API saw"),)

    def run(self, ctx: StageContext) -> None:
        (ctx.output_dir("cluster2") / "pid").write_text(str(os.getpid()))
