"""Stage `evaluate`: teacher and student on the held-out split, with the same prompt and the same verifiers.

The held-out prompts of `generate` (never trained on) are answered greedily by the teacher (its actor pool) and by
the student (a pool of student actors), both given the student's conversation: the instruction and the question, no
worked examples; and by the teacher at its best, with the worked examples it generated the traces with
(`teacher_best`). Beside them, the constant-answer floor: always answering each task's most frequent reference
answer. The student's parameter and KV-cache costs beside the teacher's come from `convert`. Every answer is graded
like a training sample (`rejection.judge`: finished on its own, an answer found by the configured extractors, the
task's verifier satisfied), so pass@1 means the same for both.

Output `eval_report`: one row per (model, prompt) and a `summary.json` (`EvaluationSummary`: pass@1 per task and
overall, mean completion length, format-failure rate per model, the floor, the economics). The same numbers are
metrics of the run (`student.pass_at_1`, `teacher.pass_at_1.<task>`, …), the floor's answers a tag, and the rows
an MLflow table (`eval/answers.json`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipeline.data.extract import extract
from pipeline.data.generation import Generation
from pipeline.data.prompts import student_messages, teacher_messages
from pipeline.data.rejection import judge
from pipeline.data.verify import is_numeric
from pipeline.stage import Progress, Stage, StageContext
from pipeline.stages.artifact_specs import EVAL_PROMPTS, EVAL_REPORT
from pipeline.stages.parquet_schemas import REPORT_SCHEMA, prompt_from_row
from pipeline.stages.results import (
    MODEL_LABELS,
    DecodeSpeed,
    EvaluationSummary,
    Floor,
    ModelResult,
    SummaryEconomics,
    read_conversion,
    write_summary,
)

MODELS = tuple(MODEL_LABELS)  # teacher, teacher_best (the teacher with worked examples: its best prompt), student


class Evaluate(Stage):
    name = "evaluate"
    inputs = ("eval_prompts", "student", "initial_student")
    outputs = (EVAL_REPORT,)
    config_sections = ("teacher", "evaluate")
    key_metrics = EvaluationSummary.KEY_METRICS
    description = "teacher vs student pass@1 on the held-out split, same prompt and verifiers"

    def run(self, ctx: StageContext) -> None:
        from pipeline.model.precision import resolve_precision

        prompts = [prompt_from_row(r) for r in ctx.read_table("eval_prompts", EVAL_PROMPTS).to_pylist()]
        if not prompts:
            raise ValueError("the held-out split is empty: set data.num_eval_prompts >= 1")
        e = ctx.config.evaluate
        if not e.num_gpus_per_actor:  # a dtype this CPU cannot run is refused before any pool starts
            resolve_precision(e.inference_dtype, "cpu")
        size = e.partition_size
        parts = {i: prompts[s : s + size] for i, s in enumerate(range(0, len(prompts), size))}
        # one bar for the stage: every model's answers to every prompt, its label naming the model answering
        bar = ctx.progress(total=len(MODELS) * len(prompts), desc="evaluate teacher")
        generations = {
            "teacher": self.teacher_answers(ctx, parts, bar, best=False),
            "teacher_best": self.teacher_answers(ctx, parts, bar, best=True),
            "student": self.student_answers(ctx, parts, bar),
        }
        bar.close()
        rows = [
            grade_row(model, p, gen, ctx.config.teacher.answer_extractors)
            for model in MODELS
            for p, gen in zip(prompts, generations[model], strict=True)
        ]
        table = pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)
        ctx.write_table("eval_report", table)
        summary = summarize(rows, self.economics(ctx, prompts[0]))
        write_summary(ctx.output_dir("eval_report"), summary)
        ctx.log_metrics(summary.to_metrics())
        ctx.set_tags(summary.to_tags())
        ctx.client.log_table(ctx.run_id, data=table.to_pandas(), artifact_file="eval/answers.json")

    def teacher_answers(self, ctx: StageContext, parts: dict, bar: Progress, best: bool) -> list[Generation]:
        """Greedy teacher answers in prompt order: with the student's prompt, or (`best`) with worked examples."""
        from actors.teacher import GenerateRequest, teacher_pool

        cfg = ctx.config
        teacher = cfg.teacher.model_copy(update={"temperature": 0.0, "max_new_tokens": cfg.evaluate.max_new_tokens})
        ask = (lambda p: teacher_messages(p.task, p.question)) if best else (lambda p: student_messages(p.question))
        requests = [(i, GenerateRequest([ask(p) for p in part], seed=0)) for i, part in parts.items()]
        with teacher_pool(
            teacher,
            f"evaluate-{ctx.run_id[:8]}.teacher{'-best' if best else ''}",
            scheduling_strategy=ctx.scheduling_strategy,
        ) as pool:
            bar.set_description("evaluate teacher, worked examples" if best else "evaluate teacher")
            return in_prompt_order(pool.map_unordered("generate", requests), bar, lambda result: result.generations)

    def student_answers(self, ctx: StageContext, parts: dict, bar: Progress) -> list[Generation]:
        """Greedy student answers, as `Generation`s so both models are graded by the same code."""
        from actors.pool import ActorPool, torch_threads
        from actors.student import AnswerRequest, StudentWorker

        e = ctx.config.evaluate
        requests = [
            (i, AnswerRequest([p.question for p in part], e.max_new_tokens, e.batch_size)) for i, part in parts.items()
        ]
        with ActorPool(
            StudentWorker,
            (
                ctx.call.inputs["student"],
                ctx.call.tracking_uri,
                str(ctx.workdir),
                torch_threads(e.num_cpus_per_actor, e.num_gpus_per_actor),
                e.inference_dtype,
                e.compile_decode_max_batch,
            ),
            size=min(e.num_actors, len(parts)),
            name=f"evaluate-{ctx.run_id[:8]}.student",
            num_cpus=e.num_cpus_per_actor,
            num_gpus=e.num_gpus_per_actor,
            scheduling_strategy=ctx.scheduling_strategy,
        ) as pool:
            bar.set_description("evaluate student")
            return in_prompt_order(
                pool.map_unordered("answer", requests),
                bar,
                lambda result: [
                    Generation(a.text, a.prompt_tokens, a.completion_tokens, a.finish_reason, result.seconds)
                    for a in result.answers
                ],
            )

    def economics(self, ctx: StageContext, prompt) -> SummaryEconomics:
        """The student's costs beside the teacher's (from `convert`) and, unless skipped, the decode speeds."""
        speeds = self.decode_speeds(ctx, prompt) if ctx.config.evaluate.decode_tokens else {}
        return SummaryEconomics.of(read_conversion(ctx.input_path("initial_student")), speeds)

    def decode_speeds(self, ctx: StageContext, prompt) -> dict[int, DecodeSpeed]:
        """Decode tokens/s of both models at each `evaluate.decode_batches` size, in this process (all its cores),
        both in the inference dtype (resolved here; its choice is the run's tag `evaluate.decode_dtype`)."""
        import os

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.data.prompts import chat_token_ids
        from pipeline.model.generate import CompiledDecode
        from pipeline.model.precision import log_precision, resolve_precision
        from pipeline.model.transformer import Transformer
        from pipeline.teacher.hf import default_cache_dir, resolve_model_dir

        e, teacher_cfg = ctx.config.evaluate, ctx.config.teacher
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))  # as in convert: nothing else runs meanwhile
        precision = log_precision(resolve_precision(e.inference_dtype, "cpu"), "evaluate's decode measurement")
        ctx.set_tags({"evaluate.decode_dtype": f"{precision.name} ({precision.reason})"})
        student_dir = ctx.input_path("student")
        student = Transformer.from_pretrained(student_dir).eval().to(precision.dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
        ids = chat_token_ids(tokenizer, student_messages(prompt.question))
        teacher = None
        if (weights := teacher_cfg.local_weights()) is not None:  # else only a server's speed, not a model's
            path = resolve_model_dir(weights, default_cache_dir())
            teacher = AutoModelForCausalLM.from_pretrained(str(path), dtype=precision.dtype).eval()
        compiled = CompiledDecode(student, e.compile_decode_max_batch) if e.compile_decode_max_batch else None
        return decode_throughput(student, teacher, ids, tuple(e.decode_batches), e.decode_tokens, compiled=compiled)


def in_prompt_order(results, bar: Progress, generations: Callable[[Any], list[Generation]]) -> list[Generation]:
    """The generations of every partition's result (`(partition, result)` pairs as a pool yields them, in any
    order), in prompt order, moving `bar` by the prompts answered."""
    out: dict[int, list[Generation]] = {}
    for i, result in results:
        out[i] = generations(result)
        bar.update(len(out[i]))
    return [g for i in sorted(out) for g in out[i]]


def decode_throughput(
    student, teacher, prompt: list[int], batches: tuple[int, ...], new_tokens: int, rounds: int = 3, compiled=None
) -> dict[int, DecodeSpeed]:
    """Greedy decode tokens/s of the student (our latent-cache loop) and the teacher (transformers' forward with its
    KV cache) on the same prompt, `new_tokens` decode steps per sequence (no stop token), at each batch size.

    Measured as `benchmarks/decode.py` measures it (`pipeline.model.decode_timing`): both in this process on the
    same threads, warmed up, interleaved round by round, decode steps timed apart from the prefill; medians of
    `rounds`. So the figures compare the two models, not two moments of a shared machine. `compiled`: the
    student's `CompiledDecode` (the warm-up round compiles it).
    """
    from pipeline.model.decode_timing import measure_speeds, student_and_teacher

    out: dict[int, DecodeSpeed] = {}
    for b in batches:
        models = student_and_teacher(student, teacher, compiled)
        speeds = measure_speeds(models, prompt, b, new_tokens, rounds=rounds).decode
        out[b] = DecodeSpeed(student=speeds["student"], teacher=speeds.get("teacher"))
    return out


def grade_row(model: str, prompt, gen: Generation, extractors) -> dict:
    verdict = judge(prompt, gen, extractors, threshold=1.0, canonical=False)
    stated, _ = extract(gen.text, is_numeric(prompt.task, prompt.answer), ("tag", "phrase"))
    return {
        "model": model,
        "prompt_id": prompt.prompt_id,
        "task": prompt.task,
        "question": prompt.question,
        "reference_answer": prompt.answer,
        "completion": gen.text,
        "extracted_answer": verdict.answer,
        "correct": verdict.accepted,
        "format_ok": stated is not None,
        "reason": verdict.reason,
        "finish_reason": gen.finish_reason,
        "completion_tokens": gen.completion_tokens,
    }


def constant_answer_floor(rows: list[dict]) -> Floor:
    """The pass@1 of always answering each task's most frequent reference answer on this held-out split."""
    refs = defaultdict(list)
    for r in rows:
        if r["model"] == MODELS[0]:
            refs[r["task"]].append(r["reference_answer"])
    by_task, answers, hits = {}, {}, 0
    for task, answers_of_task in sorted(refs.items()):
        answer, count = Counter(answers_of_task).most_common(1)[0]
        by_task[task], answers[task] = count / len(answers_of_task), answer
        hits += count
    return Floor(
        pass_at_1=hits / max(sum(len(v) for v in refs.values()), 1), pass_at_1_by_task=by_task, answer_by_task=answers
    )


def model_result(rows: list[dict]) -> ModelResult:
    """pass@1 overall and per task, mean completion tokens, format-failure and truncation rates of one model's rows."""
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r["correct"])
    n = max(len(rows), 1)
    return ModelResult(
        pass_at_1=sum(r["correct"] for r in rows) / n,
        pass_at_1_by_task={t: sum(v) / len(v) for t, v in sorted(by_task.items())},
        mean_completion_tokens=sum(r["completion_tokens"] for r in rows) / n,
        format_failure_rate=sum(not r["format_ok"] for r in rows) / n,
        truncated_rate=sum(r["finish_reason"] == "length" for r in rows) / n,
        prompts=len(rows),
    )


def summarize(rows: list[dict], economics: SummaryEconomics | None = None) -> EvaluationSummary:
    """Every model's result on its graded rows, the constant-answer floor, and the student's economics."""

    def of(model: str) -> ModelResult:
        return model_result([r for r in rows if r["model"] == model])

    return EvaluationSummary(
        teacher=of("teacher"),
        teacher_best=of("teacher_best"),
        student=of("student"),
        floor=constant_answer_floor(rows),
        economics=economics or SummaryEconomics(),
    )
