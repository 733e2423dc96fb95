"""Stage `generate`: teacher reasoning traces for the training prompts, graded by rejection sampling.

Prompts come from the configured source (a reasoning-gym mixture or a user file) in two disjoint splits: the
held-out split is written as `eval_prompts` for `evaluate`; the training split is cut into fixed partitions of
`generate.shard_size` prompts. Each partition is one unit of work for the teacher actor pool and one Parquet shard
named after it, written to the stage's resume space as soon as it is graded. A partition retried after an actor
died regenerates the same samples (its seed is fixed) and overwrites its own shard; a stage re-run after a crash
skips partitions whose shard is already there. Every sample is kept, accepted or flagged with its reason.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.config import config_hash
from pipeline.data.generation import Generation
from pipeline.data.prompts import teacher_messages
from pipeline.data.rejection import REJECT_REASONS, judge, select
from pipeline.data.sources import Prompt, load_prompts
from pipeline.stage import Stage, StageContext
from pipeline.stages.artifact_specs import EVAL_PROMPTS, SAMPLES
from pipeline.stages.parquet_schemas import SAMPLE_SCHEMA, prompts_table
from pipeline.stages.shards import Shards


@dataclass
class Partition:
    index: int
    prompts: list[Prompt]
    seed: int


def partitions(prompts: list[Prompt], shard_size: int, seed: int) -> list[Partition]:
    """Fixed, seeded partitions of the training prompts: the unit of work, retry and output shard."""
    return [
        Partition(i, prompts[start : start + shard_size], int(config_hash([seed, i])[:8], 16))
        for i, start in enumerate(range(0, len(prompts), shard_size))
    ]


def conversations(part: Partition, cfg) -> list[list[dict]]:
    """The teacher conversations of a partition: `samples_per_prompt` per prompt, empty prompts left out."""
    return [
        teacher_messages(p.task, p.question, cfg.data.prompt_style)
        for p in part.prompts
        if p.question.strip()
        for _ in range(cfg.generate.samples_per_prompt)
    ]


def grade(part: Partition, generations: list[Generation], teacher_id: str, cfg) -> pa.Table:
    """Every sample of a partition as rows: judged one by one, then per prompt (duplicates, quota)."""
    g, t = cfg.generate, cfg.teacher
    it = iter(generations)
    sampling = json.dumps(
        {"temperature": t.temperature, "top_p": t.top_p, "max_new_tokens": t.max_new_tokens, "seed": part.seed},
        sort_keys=True,
    )
    rows = []
    for p in part.prompts:
        messages = teacher_messages(p.task, p.question, cfg.data.prompt_style)
        verdicts = []
        for j in range(g.samples_per_prompt):
            gen = next(it) if p.question.strip() else Generation("", 0, 0, "bad_prompt", 0.0, error="empty prompt")
            verdicts.append(judge(p, gen, t.answer_extractors, g.accept_threshold, g.canonical_answer))
            rows.append((p, j, messages, gen, verdicts[-1]))
        select(verdicts, g.max_accepted_per_prompt)
    return pa.Table.from_pylist(
        [
            {
                "sample_id": f"{p.prompt_id}-{j}",
                "prompt_id": p.prompt_id,
                "partition": part.index,
                "task": p.task,
                "question": p.question,
                "messages": messages,
                "completion": v.completion,
                "raw_completion": gen.text,
                "extracted_answer": v.answer,
                "answer_source": v.answer_source,
                "reference_answer": p.answer,
                "score": v.score,
                "accepted": v.accepted,
                "reject_reason": v.reason,
                "error": gen.error,
                "teacher_id": teacher_id,
                "sampling": sampling,
                "finish_reason": gen.finish_reason,
                "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": gen.completion_tokens,
                "latency_s": gen.seconds,
            }
            for p, j, messages, gen, v in rows
        ],
        schema=SAMPLE_SCHEMA,
    )


class Generate(Stage):
    name = "generate"
    outputs = (SAMPLES, EVAL_PROMPTS)
    config_sections = ("teacher", "data", "generate")
    key_metrics = ("acceptance_rate", "samples", "tokens_per_s")
    description = "teacher traces on a Ray actor pool, verified by rejection sampling"

    def run(self, ctx: StageContext) -> None:
        from actors.teacher import GenerateRequest, teacher_pool

        cfg = ctx.config
        splits = load_prompts(cfg.data)
        ctx.write_table("eval_prompts", prompts_table(splits["eval"]))
        parts = partitions(splits["train"], cfg.generate.shard_size, cfg.generate.seed)
        shards = Shards(ctx.resume_dir, SAMPLES)
        missing = set(shards.missing([p.index for p in parts]))
        todo = [p for p in parts if p.index in missing]
        resumed = len(parts) - len(todo)
        requests = [(part.index, GenerateRequest(conversations(part, cfg), part.seed)) for part in todo]

        total = sum(len(p.prompts) for p in todo) * cfg.generate.samples_per_prompt
        bar = ctx.progress(total=total, desc="generate")
        retries: Counter[int] = Counter()
        stats = _Stats()
        if requests:
            t_pool = time.perf_counter()
            with teacher_pool(
                cfg.teacher,
                f"generate-{ctx.run_id[:8]}.teacher",
                cfg.generate.max_in_flight_per_actor,
                ctx.scheduling_strategy,
            ) as pool:
                stats = _Stats()  # throughput counts from a loaded pool; startup is its own metric
                ctx.log_metrics({"actor_startup_s": stats.start - t_pool})
                for index, result in pool.map_unordered(
                    "generate", requests, cfg.generate.max_attempts, on_retry=lambda key, _: retries.update([key])
                ):
                    table = grade(parts[index], result.generations, result.teacher_id, cfg)
                    shards.write(index, table)
                    stats.add(table, result)
                    record_partition(ctx, table, result.completion_tokens, stats)
                    bar.update(table.num_rows)
                    bar.set_description(
                        f"generate {stats.samples / stats.elapsed:.1f} samples/s, "
                        f"accepted {stats.accepted / max(stats.samples, 1):.0%}"
                    )
                    ctx.log_metrics(
                        {
                            "samples_done": stats.samples,
                            "acceptance_rate_so_far": stats.accepted / max(stats.samples, 1),
                        },
                        step=stats.partitions,
                    )
                replaced = pool.replacements
        else:
            replaced = 0
        bar.close()

        out = ctx.output_dir("samples")
        shards.publish([p.index for p in parts], out)
        samples = shards.read([p.index for p in parts])
        ctx.log_metrics(
            {
                **summarize(samples),
                **stats.throughput(),
                "partitions": len(parts),
                "resumed_partitions": resumed,
                "retried_partitions": len(retries),
                "replaced_actors": replaced,
                "eval_prompts": len(splits["eval"]),
            }
        )
        self.log_dataset(ctx, samples)

    def log_dataset(self, ctx: StageContext, samples: pa.Table) -> None:
        """The samples as an MLflow dataset of this run (context `output`) and a preview table to eyeball."""
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import DatasetInput, InputTag

        df = samples.drop_columns(["messages"]).to_pandas()
        uri = ctx.client.get_run(ctx.run_id).info.artifact_uri.rstrip("/") + "/outputs/samples"
        # MLflow's hints about inferring a model signature do not apply here; the schema is inferred lazily, when
        # the dataset becomes an entity
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dataset = from_pandas(df, source=dataset_source(uri, ctx.call.tracking_uri), name="samples")
            entity = dataset._to_mlflow_entity()
        ctx.client.log_inputs(ctx.run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", "output")])])
        preview = df[
            [
                "sample_id",
                "task",
                "question",
                "completion",
                "extracted_answer",
                "reference_answer",
                "accepted",
                "reject_reason",
            ]
        ]
        preview = preview.groupby("accepted", group_keys=False).head(20)
        ctx.client.log_table(ctx.run_id, preview, "samples_preview.json")


def dataset_source(uri: str, tracking_uri: str):
    """The dataset's source for MLflow lineage: the artifact URI itself, or for a tracking server's proxied store
    (`mlflow-artifacts:`, which MLflow has no dataset source for) the server's HTTP URL of the same artifact."""
    from urllib.parse import urlparse

    from mlflow.data.http_dataset_source import HTTPDatasetSource

    parsed = urlparse(uri)
    if parsed.scheme == "mlflow-artifacts":
        base = (
            tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else f"http://{parsed.netloc}"
        )
        return HTTPDatasetSource(f"{base}/api/2.0/mlflow-artifacts/artifacts{parsed.path}")
    return uri


class _Stats:
    """Running totals for the progress bar and the throughput metrics."""

    def __init__(self):
        self.start = time.perf_counter()
        self.samples = self.accepted = self.tokens = self.partitions = 0
        self.worker_tokens: Counter = Counter()
        self.worker_seconds: Counter = Counter()

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def add(self, table: pa.Table, result) -> None:
        self.partitions += 1
        self.samples += table.num_rows
        self.accepted += sum(table["accepted"].to_pylist())
        self.tokens += result.completion_tokens
        self.worker_tokens[result.worker] += result.completion_tokens
        self.worker_seconds[result.worker] += result.seconds

    def throughput(self) -> dict[str, float]:
        if not self.partitions:
            return {}
        out = {
            "tokens_per_s": self.tokens / self.elapsed,
            "samples_per_s": self.samples / self.elapsed,
            "generate_seconds": self.elapsed,
        }
        for i, worker in enumerate(sorted(self.worker_tokens)):
            out[f"actor_{i}.tokens_per_s"] = self.worker_tokens[worker] / max(self.worker_seconds[worker], 1e-9)
        return out


@dataclass
class _TaskTally:
    """One task's prompts and samples in a partition, accepted or not."""

    prompts: set[str] = field(default_factory=set)
    accepted_prompts: set[str] = field(default_factory=set)
    samples: int = 0
    accepted: int = 0


def record_partition(ctx: StageContext, table: pa.Table, tokens: int, stats: _Stats) -> None:
    """Live metrics of one graded partition: prompts and samples per task, accepted or not; throughput."""
    by_task: dict[str, _TaskTally] = {}
    for row in table.select(["task", "prompt_id", "accepted"]).to_pylist():
        t = by_task.setdefault(row["task"], _TaskTally())
        t.prompts.add(row["prompt_id"])
        t.samples += 1
        if row["accepted"]:
            t.accepted_prompts.add(row["prompt_id"])
            t.accepted += 1
    for task, t in by_task.items():
        ctx.record("moeforge_prompts_generated", len(t.prompts), task=task)
        ctx.record("moeforge_prompts_accepted", len(t.accepted_prompts), task=task)
        ctx.record("moeforge_samples_generated", t.samples, task=task)
        ctx.record("moeforge_samples_accepted", t.accepted, task=task)
    ctx.record("moeforge_generate_tokens", tokens)
    ctx.record("moeforge_generate_tokens_per_second", stats.tokens / stats.elapsed)


def summarize(samples: pa.Table) -> dict[str, float]:
    """Acceptance overall, per task and per reject reason; completion lengths."""
    rows = samples.select(["task", "accepted", "reject_reason", "completion_tokens"]).to_pylist()
    n = len(rows)
    out = {
        "samples": n,
        "accepted": sum(r["accepted"] for r in rows),
        "acceptance_rate": sum(r["accepted"] for r in rows) / max(n, 1),
        "format_failure_rate": sum(r["reject_reason"] == "no_answer" for r in rows) / max(n, 1),
        "mean_completion_tokens": sum(r["completion_tokens"] for r in rows) / max(n, 1),
    }
    for task in sorted({r["task"] for r in rows}):
        of_task = [r for r in rows if r["task"] == task]
        out[f"acceptance_rate.{task}"] = sum(r["accepted"] for r in of_task) / len(of_task)
    for reason in REJECT_REASONS:
        out[f"rejected.{reason}"] = sum(r["reject_reason"] == reason for r in rows)
    return out
