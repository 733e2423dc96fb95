"""Held-out pass@1 of a trained student run by llama.cpp on its GGUF export, against the same student in moeforge's
engine, on the same held-out prompts: the export's fidelity where it matters.

Reads a finished pipeline run (default: the latest of the config's tracking store whose `evaluate` ran) of a
student in DeepSeek-V3's standard layout: its `student` and its held-out split (`eval_prompts`). Every held-out
prompt is answered greedily, with the run's `evaluate.max_new_tokens`, in the student's own prompt format, by
  - moeforge's engine in fp32 (`pipeline.student.Student`, what `evaluate` runs), and
  - llama.cpp (the `moeforge[llamacpp]` extra) on the student's GGUF export at each `--quants`, every prompt's
    sequence batched into one `llama_decode` per step (`pipeline.serving.llama_cpp_runner`);
and graded by `evaluate`'s own grader. Printed: pass@1 per task and overall for each, the prompts each engine gets
right where fp32 does not and the reverse (with the exact sign test), and how many answers are the same text.

    .venv/bin/python benchmarks/export_fidelity.py [--config tiny] [--set key=value ...] [--run RUN_ID]
        [--quants f32,q4_1] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

from _common import describe, result
from compression_points import output_refs
from refine_quality import sign_test
from student_quality import stage_metrics

from pipeline.artifacts import fetch, read_table
from pipeline.config import load_config
from pipeline.data.generation import Generation
from pipeline.stages.artifact_specs import EVAL_PROMPTS
from pipeline.stages.evaluate import grade_row
from pipeline.stages.parquet_schemas import prompt_from_row
from pipeline.tracking import Tracker, resolve_tracking_uri


def llama_cpp_answers(gguf: Path, prompts: list[list[int]], max_new: int, eos: int, threads: int) -> list[list[int]]:
    """Greedy completions of every prompt, all sequences decoded together (one `llama_decode` per step)."""
    from pipeline.serving.llama_cpp_runner import LlamaCppRunner

    runner = LlamaCppRunner(gguf, len(prompts), max(len(p) for p in prompts) + max_new + 1, threads)
    try:
        slots = [runner.allocate() for _ in prompts]
        logits = runner.prefill(slots, prompts)
        out: list[list[int]] = [[] for _ in prompts]
        running = list(range(len(prompts)))
        while running:
            still = []
            for i, token in zip(running, logits.argmax(-1).tolist(), strict=True):
                out[i].append(token)
                if token != eos and len(out[i]) < max_new:
                    still.append(i)
            running = still
            if running:
                logits = runner.decode([slots[i] for i in running], [out[i][-1] for i in running])
        return out
    finally:
        runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run", default=None, help="a pipeline run id (default: the latest evaluated one)")
    parser.add_argument("--quants", default="f32,q4_1", help="GGUF quantizations to run in llama.cpp")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from pipeline.data.prompts import chat_token_ids, student_messages
    from pipeline.export import export
    from pipeline.student.load import Student

    cfg = load_config(args.config, args.overrides)
    tracker = Tracker(cfg.tracking)
    run, _ = stage_metrics(tracker, args.run)
    refs = output_refs(tracker.stage_runs(run))
    uri, workdir = resolve_tracking_uri(cfg.tracking), Path(cfg.tracking.workdir)
    student_dir = fetch(refs.get("student") or refs["trained_student"], uri, workdir)  # refine off: the trained one
    rows = read_table(fetch(refs["eval_prompts"], uri, workdir), EVAL_PROMPTS, refs["eval_prompts"].hash).to_pylist()
    prompts = [prompt_from_row(r) for r in rows]
    max_new, extractors = cfg.evaluate.max_new_tokens, cfg.teacher.answer_extractors
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    eos = tokenizer.eos_token_id
    ids = [chat_token_ids(tokenizer, student_messages(p.question)) for p in prompts]

    texts: dict[str, list[str]] = {}
    answers = Student(student_dir).answer([p.question for p in prompts], max_new, batch_size=cfg.evaluate.batch_size)
    texts["fp32"] = [a.text for a in answers]
    graded = {"fp32": [Generation(a.text, a.prompt_tokens, a.completion_tokens, a.finish_reason, 0.0) for a in answers]}
    with tempfile.TemporaryDirectory(prefix="moeforge-export-fidelity-") as tmp:
        for quant in args.quants.split(","):
            gguf = export(student_dir, "gguf", Path(tmp) / quant, quant)  # type: ignore[arg-type]
            completions = llama_cpp_answers(gguf, ids, max_new, eos, args.threads)
            texts[quant] = [tokenizer.decode([t for t in c if t != eos], skip_special_tokens=True) for c in completions]
            graded[quant] = [
                Generation(t, len(p), len(c), "stop" if c and c[-1] == eos else "length", 0.0)
                for t, p, c in zip(texts[quant], ids, completions, strict=True)
            ]
    correct = {
        name: [grade_row(name, p, g, extractors)["correct"] for p, g in zip(prompts, gens, strict=True)]
        for name, gens in graded.items()
    }
    tasks = sorted({p.task for p in prompts})
    print(f"{describe()}; pipeline run {run}; {len(prompts)} held-out prompts, greedy, {max_new} new tokens")
    print(f"{'held-out pass@1':<22}" + "".join(f"{t[:16]:>18}" for t in [*tasks, "overall"]))
    figures: dict[str, float | int] = {}
    for name, marks in correct.items():
        by_task = defaultdict(list)
        for p, ok in zip(prompts, marks, strict=True):
            by_task[p.task].append(ok)
        cells = [sum(by_task[t]) / len(by_task[t]) for t in tasks] + [sum(marks) / len(marks)]
        label = "moeforge fp32" if name == "fp32" else f"llama.cpp {name}"
        print(f"{label:<22}" + "".join(f"{c:>18.3f}" for c in cells))
        figures[f"{name}_pass_at_1"] = round(cells[-1], 4)
    for name in [q for q in correct if q != "fp32"]:
        gained = sum(q and not f for q, f in zip(correct[name], correct["fp32"], strict=True))
        lost = sum(f and not q for q, f in zip(correct[name], correct["fp32"], strict=True))
        same = sum(a == b for a, b in zip(texts[name], texts["fp32"], strict=True))
        p_value = sign_test(gained, lost)
        print(
            f"llama.cpp {name} against fp32: +{gained} -{lost} prompts (sign test p={p_value:.3f}), "
            f"{same} of {len(prompts)} answers the same text"
        )
        figures |= {
            f"{name}_minus_fp32": round(figures[f"{name}_pass_at_1"] - figures["fp32_pass_at_1"], 4),
            f"{name}_gained": gained,
            f"{name}_lost": lost,
            f"{name}_same_text": same,
        }
    result(prompts=len(prompts), **figures)


if __name__ == "__main__":
    main()
