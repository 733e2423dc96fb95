"""Stage `evaluate`: teacher and student on the held-out split, with the same prompt and the same verifiers.

The held-out prompts of `generate` (never trained on) are answered greedily by the teacher (its actor pool) and by
the student (a pool of student actors), both given the student's conversation: the instruction and the question,
no worked examples. Every answer is graded like a training sample (`rejection.judge`: finished on its own, an
answer found by the configured extractors, the task's verifier satisfied), so pass@1 means the same for both.

Output `eval_report`: one row per (model, prompt) and a `summary.json` (pass@1 per task and overall, mean
completion length, format-failure rate per model). The same numbers are metrics of the run
(`student.pass_at_1`, `teacher.pass_at_1.<task>`, …) and the rows an MLflow table (`eval/answers.json`).
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

from pipeline.artifacts import write_json
from pipeline.data.extract import extract
from pipeline.data.prompts import student_messages
from pipeline.data.rejection import judge
from pipeline.data.verify import is_numeric
from pipeline.stage import Stage, StageContext
from pipeline.stages.artifact_specs import EVAL_PROMPTS, EVAL_REPORT, REPORT_SCHEMA, prompt_from_row
from pipeline.teacher.base import Generation

MODELS = ("teacher", "student")


class Evaluate(Stage):
    name = "evaluate"
    inputs = ("eval_prompts", "student")
    outputs = (EVAL_REPORT,)
    config_sections = ("teacher", "evaluate")
    key_metrics = ("teacher.pass_at_1", "student.pass_at_1")
    description = "teacher vs student pass@1 on the held-out split, same prompt and verifiers"

    def run(self, ctx: StageContext) -> None:
        prompts = [prompt_from_row(r) for r in ctx.read_table("eval_prompts", EVAL_PROMPTS).to_pylist()]
        if not prompts:
            raise ValueError("the held-out split is empty: set data.num_eval_prompts >= 1")
        size = ctx.config.evaluate.partition_size
        parts = {i: prompts[s:s + size] for i, s in enumerate(range(0, len(prompts), size))}
        generations = {"teacher": self.teacher_answers(ctx, parts), "student": self.student_answers(ctx, parts)}
        rows = [grade_row(model, p, gen, ctx.config.teacher.answer_extractors)
                for model in MODELS for p, gen in zip(prompts, generations[model], strict=True)]
        table = pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)
        ctx.write_table("eval_report", table)
        summary = summarize(rows)
        write_json(ctx.output_dir("eval_report") / "summary.json", summary)
        ctx.log_metrics(flatten(summary))
        ctx.client.log_table(ctx.run_id, data=table.to_pandas(), artifact_file="eval/answers.json")

    def teacher_answers(self, ctx: StageContext, parts: dict) -> list[Generation]:
        """Greedy teacher answers with the student's prompt, in prompt order."""
        from actors.teacher import GenerateRequest, teacher_pool

        cfg = ctx.config
        teacher = cfg.teacher.model_copy(update={"temperature": 0.0, "max_new_tokens": cfg.evaluate.max_new_tokens})
        requests = [(i, GenerateRequest([student_messages(p.question) for p in part], seed=0))
                    for i, part in parts.items()]
        out: dict[int, list[Generation]] = {}
        bar = ctx.progress(total=sum(len(p) for p in parts.values()), desc="evaluate teacher")
        with teacher_pool(teacher, f"evaluate-{ctx.run_id[:8]}.teacher",
                          scheduling_strategy=ctx.scheduling_strategy) as pool:
            for i, result in pool.map_unordered("generate", requests):
                out[i] = result.generations
                bar.update(len(result.generations))
        bar.close()
        return [g for i in sorted(out) for g in out[i]]

    def student_answers(self, ctx: StageContext, parts: dict) -> list[Generation]:
        """Greedy student answers, as `Generation`s so both models are graded by the same code."""
        from actors.pool import ActorPool
        from actors.student import AnswerRequest, StudentWorker

        e = ctx.config.evaluate
        threads = max(1, int(e.num_cpus_per_actor)) if e.num_gpus_per_actor == 0 else None
        requests = [(i, AnswerRequest([p.question for p in part], e.max_new_tokens, e.batch_size))
                    for i, part in parts.items()]
        out: dict[int, list[Generation]] = {}
        bar = ctx.progress(total=sum(len(p) for p in parts.values()), desc="evaluate student")
        with ActorPool(StudentWorker, (ctx.call.inputs["student"], ctx.call.tracking_uri, str(ctx.workdir), threads),
                       size=min(e.num_actors, len(parts)), name=f"evaluate-{ctx.run_id[:8]}.student",
                       num_cpus=e.num_cpus_per_actor, num_gpus=e.num_gpus_per_actor,
                       scheduling_strategy=ctx.scheduling_strategy) as pool:
            for i, result in pool.map_unordered("answer", requests):
                out[i] = [Generation(a.text, a.prompt_tokens, a.completion_tokens, a.finish_reason,
                                     result.seconds) for a in result.answers]
                bar.update(len(result.answers))
        bar.close()
        return [g for i in sorted(out) for g in out[i]]


def grade_row(model: str, prompt, gen: Generation, extractors) -> dict:
    verdict = judge(prompt, gen, extractors, threshold=1.0, canonical=False)
    stated, _ = extract(gen.text, is_numeric(prompt.task, prompt.answer), ("tag", "phrase"))
    return {"model": model, "prompt_id": prompt.prompt_id, "task": prompt.task, "question": prompt.question,
            "reference_answer": prompt.answer, "completion": gen.text, "extracted_answer": verdict.answer,
            "correct": verdict.accepted, "format_ok": stated is not None, "reason": verdict.reason,
            "finish_reason": gen.finish_reason, "completion_tokens": gen.completion_tokens}


def summarize(rows: list[dict]) -> dict:
    """Per model: pass@1 overall and per task, mean completion tokens, format-failure rate, counts."""
    summary: dict = {}
    for model in MODELS:
        mine = [r for r in rows if r["model"] == model]
        by_task = defaultdict(list)
        for r in mine:
            by_task[r["task"]].append(r["correct"])
        n = max(len(mine), 1)
        summary[model] = {
            "pass_at_1": sum(r["correct"] for r in mine) / n,
            "pass_at_1_by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())},
            "mean_completion_tokens": sum(r["completion_tokens"] for r in mine) / n,
            "format_failure_rate": sum(not r["format_ok"] for r in mine) / n,
            "truncated_rate": sum(r["finish_reason"] == "length" for r in mine) / n,
            "prompts": len(mine),
        }
    return summary


def flatten(summary: dict) -> dict[str, float]:
    out = {}
    for model, s in summary.items():
        for key, value in s.items():
            if isinstance(value, dict):
                out.update({f"{model}.{key.replace('_by_task', '')}.{task}": v for task, v in value.items()})
            else:
                out[f"{model}.{key}"] = value
    return out
