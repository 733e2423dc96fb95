"""Does the inference dtype change what the student answers? Held-out pass@1 of one trained student per dtype.

A finished run's `student` and `eval_prompts` artifacts (their folders under the run's MLflow artifact store) are
read back; the student answers every held-out question greedily in each dtype (`Student(..., dtype)`, as evaluate
and serving load it) with evaluate's prompt, token budget and grading (`evaluate.grade_row`, the rejection
sampler's verifiers). Beside the pass@1 of each: how many answers differ in text and in correctness, and the noise
of a paired difference on this many questions (2 x sqrt(discordant) / n).

    .venv/bin/python benchmarks/inference_dtype_quality.py --student DIR --prompts DIR [--dtypes float32,bfloat16]
        [--max-new-tokens 256] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from pathlib import Path

from _common import describe, result

from pipeline.artifacts import read_table
from pipeline.config import EvaluateConfig, TeacherConfig
from pipeline.data.generation import Generation
from pipeline.stages.artifact_specs import EVAL_PROMPTS
from pipeline.stages.evaluate import grade_row
from pipeline.stages.parquet_schemas import prompt_from_row
from pipeline.student import Student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, required=True, help="a `student` artifact folder")
    ap.add_argument("--prompts", type=Path, required=True, help="an `eval_prompts` artifact folder")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=EvaluateConfig().max_new_tokens)
    ap.add_argument("--batch-size", type=int, default=EvaluateConfig().batch_size)
    args = ap.parse_args()
    prompts = [prompt_from_row(r) for r in read_table(args.prompts, EVAL_PROMPTS).to_pylist()]
    extractors = TeacherConfig().answer_extractors
    print(f"{describe()}; {len(prompts)} held-out prompts, {args.max_new_tokens} new tokens at most")
    rows: dict[str, list[dict]] = {}
    for dtype in args.dtypes.split(","):
        student = Student(args.student, "cpu", dtype)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        answers = student.answer([p.question for p in prompts], args.max_new_tokens, batch_size=args.batch_size)
        seconds = time.perf_counter() - t0
        gens = [Generation(a.text, a.prompt_tokens, a.completion_tokens, a.finish_reason, seconds) for a in answers]
        rows[dtype] = [grade_row("student", p, g, extractors) for p, g in zip(prompts, gens, strict=True)]
        by_task = defaultdict(list)
        for r in rows[dtype]:
            by_task[r["task"]].append(r["correct"])
        tasks = " ".join(f"{t} {sum(v) / len(v):.3f}" for t, v in sorted(by_task.items()))
        overall = sum(r["correct"] for r in rows[dtype]) / len(prompts)
        print(f"{student.precision.name:>9}: pass@1 {overall:.3f} ({tasks}); {seconds:.0f} s")
    figures: dict[str, float] = {
        f"{d}_pass_at_1": sum(r["correct"] for r in rs) / len(prompts) for d, rs in rows.items()
    }
    names = list(rows)
    for other in names[1:]:
        a, b = rows[names[0]], rows[other]
        discordant = sum(x["correct"] != y["correct"] for x, y in zip(a, b, strict=True))
        figures[f"{other}_minus_{names[0]}"] = figures[f"{other}_pass_at_1"] - figures[f"{names[0]}_pass_at_1"]
        figures[f"{other}_noise_2se"] = 2 * math.sqrt(discordant) / len(prompts)
        figures[f"{other}_same_text"] = sum(
            x["completion"] == y["completion"] for x, y in zip(a, b, strict=True)
        ) / len(prompts)
        print(
            f"{other} vs {names[0]}: {discordant} answers differ in correctness, "
            f"texts equal {figures[f'{other}_same_text']:.0%}"
        )
    result(**figures)


if __name__ == "__main__":
    main()
