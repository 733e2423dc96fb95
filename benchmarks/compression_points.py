"""What each compression setting costs in held-out pass@1: the converted student, after recovery, and after task
distillation, beside the teacher and the constant-answer floor, on the tiny run's data.

Every point is a real `moeforge run --config tiny` with the point's model knobs, in one working directory, so
`generate` and `distill` come from the stage cache after the first and the points share their training data and
held-out split; `convert`, `train` and `evaluate` rerun. With `--recovery-steps N` each point is first converted
alone (`--until convert`, no recovery), then run whole with `convert.recovery_steps=N`: the converted student
is KL-distilled towards the teacher on the teacher's non-held-out text (`pipeline/train/recovery.py`) before task
distillation on the accepted traces. Each stage's student (stage `convert`'s output, before any task training)
is graded on the same held-out prompts, greedily, with the same verifiers (`evaluate`'s `grade_row`).

    .venv/bin/python benchmarks/compression_points.py [--workdir DIR] [--points tiny,medium,target]
        [--recovery-steps N] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, result
from student_quality import stage_metrics as run_metrics

from pipeline.config import load_config
from pipeline.stages.results import Economics, EvaluationSummary, Fidelity, PassAt1, Recovery
from pipeline.tracking import Tracker, resolve_tracking_uri

POINTS = {
    "tiny": [],  # the default: every layer, 16 of 32 rope pairs, full-rank latent, 12 of 20 experts
    "medium": ["model.qk_rope_head_dim=16", "model.kv_lora_rank=96", "model.n_activated_experts=8"],
    "target": [
        "model.n_layers=24",
        "model.qk_rope_head_dim=8",
        "model.kv_lora_rank=72",
        "model.n_activated_experts=8",
    ],  # the cost targets: <= 50% active, <= 25% cache
    # the cost targets spent on rope instead (twice the rotary pairs, the cache exactly at 25%): rope was the
    # costliest knob per byte (docs/benchmarks.md)
    "target_rope16": [
        "model.n_layers=24",
        "model.qk_rope_head_dim=16",
        "model.kv_lora_rank=72",
        "model.n_activated_experts=8",
    ],
}


def output_refs(stage_runs) -> dict:
    """Every artifact a pipeline run's stages produced or took from the cache, from their tags."""
    from pipeline.artifacts import ArtifactRef
    from pipeline.tracking import P

    refs = {}
    for r in stage_runs:
        tags = r.data.tags
        for key, uri in tags.items():
            if key.startswith(f"{P}output.") and key.endswith(".uri"):
                name = key[len(f"{P}output.") : -len(".uri")]
                refs[name] = ArtifactRef(
                    name, uri, tags[f"{P}output.{name}.hash"], tags.get(P + "cached_from", r.info.run_id)
                )
    return refs


def grade_initial_student(refs: dict, tracking_uri: str, workdir: Path) -> dict[str, float]:
    """pass@1 per task and overall of the run's `initial_student` on its `eval_prompts`."""
    from collections import defaultdict

    import pyarrow.parquet as pq

    from pipeline.artifacts import fetch
    from pipeline.data.generation import Generation
    from pipeline.stages.evaluate import grade_row
    from pipeline.stages.parquet_schemas import prompt_from_row
    from pipeline.student.load import Student

    student = Student(fetch(refs["initial_student"], tracking_uri, workdir))
    prompts_dir = fetch(refs["eval_prompts"], tracking_uri, workdir)
    prompts = [prompt_from_row(r) for f in sorted(prompts_dir.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    answers = student.answer([p.question for p in prompts], max_new_tokens=128, batch_size=16)
    by_task = defaultdict(list)
    extractors = load_config("tiny").teacher.answer_extractors
    for p, a in zip(prompts, answers, strict=True):
        gen = Generation(a.text, a.prompt_tokens, a.completion_tokens, a.finish_reason, 0.0)
        by_task[p.task].append(grade_row("student", p, gen, extractors)["correct"])
    out = {t: sum(v) / len(v) for t, v in sorted(by_task.items())}
    out["overall"] = sum(sum(v) for v in by_task.values()) / len(prompts)
    return out


def run_point(moeforge: str, sets: list[str], until: str | None = None) -> tuple[dict, dict, Path, str]:
    """Run the pipeline with `sets`; its artifacts, its stages' metrics, work dir and tracking URI."""
    until_args = ["--until", until] if until else []
    proc = subprocess.run(
        [moeforge, "run", "--config", "tiny", *(a for s in sets for a in ("--set", s)), *until_args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if proc.returncode != 0:
        sys.exit(f"moeforge run {' '.join(sets)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    cfg = load_config("tiny", sets)
    tracker = Tracker(cfg.tracking)
    run = tracker.pipeline_runs()[0].info.run_id
    # a cache hit's metrics come from the run that produced them
    if until == "convert":
        _, metrics = run_metrics(tracker, run, "convert", lambda m: Fidelity.from_metrics(m) is not None)
    else:
        _, metrics = run_metrics(tracker, run)
    return (
        output_refs(tracker.stage_runs(run)),
        metrics,
        Path(cfg.tracking.workdir),
        resolve_tracking_uri(cfg.tracking),
    )


def fidelity_of(metrics: dict) -> Fidelity:
    """The converted student's distance to the teacher, from the run's `convert` metrics."""
    fidelity = Fidelity.from_metrics(metrics["convert"])
    assert fidelity is not None, "a student converted from the teacher"
    return fidelity


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None, help="reuse a tiny run's working directory (its data is cached)")
    parser.add_argument("--points", default=",".join(POINTS))
    parser.add_argument("--recovery-steps", type=int, default=0, help="recovery before task distillation (0: none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="further overrides, every point")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="moeforge-points-")
    moeforge = str(Path(sys.executable).parent / "moeforge")
    rows = {}
    for name in args.points.split(","):
        sets = [f"tracking.workdir={workdir}", *POINTS[name], *args.overrides]
        t0 = time.perf_counter()
        row: dict = {}
        if args.recovery_steps:
            refs, metrics, wd, uri = run_point(moeforge, sets, until="convert")
            row["converted"] = grade_initial_student(refs, uri, wd)
            row["kl_converted"] = fidelity_of(metrics).kl_to_teacher
            sets.append(f"convert.recovery_steps={args.recovery_steps}")
        refs, metrics, wd, uri = run_point(moeforge, sets)
        kl, costs = fidelity_of(metrics).kl_to_teacher, Economics.from_metrics(metrics["convert"])
        ev = EvaluationSummary.from_metrics(metrics["evaluate"])
        assert costs is not None and ev is not None and ev.floor is not None, "a converted, evaluated run"
        start = grade_initial_student(refs, uri, wd)
        if args.recovery_steps:
            recovery = Recovery.from_metrics(metrics["convert"])
            assert recovery is not None, "a run with convert.recovery_steps > 0"
            row.update(recovered=start, kl_recovered=kl, recovery_minutes=recovery.recovery_seconds / 60)
        else:
            row.update(converted=start, kl_converted=kl)
        tasks = sorted(k for k in start if k != "overall")

        def per_task(result: PassAt1, tasks=tasks) -> dict[str, float]:
            return {t: result.pass_at_1_by_task[t] for t in tasks} | {"overall": result.pass_at_1}

        row.update(
            active=costs.active_param_ratio,
            cache=costs.cache_ratio,
            distilled=per_task(ev.student),
            teacher=per_task(ev.teacher),
            floor=per_task(ev.floor),
            minutes=(time.perf_counter() - t0) / 60,
        )
        rows[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)
    stages = ["converted", "recovered", "distilled"] if args.recovery_steps else ["converted", "distilled"]
    print(
        f"\n{'point':<8}{'active':>8}{'cache':>7}{'KL':>7}  pass@1 {' -> '.join(stages)} (teacher, floor) per task"
        + (f"; KL after {args.recovery_steps} recovery steps" if args.recovery_steps else "")
    )
    for name, r in rows.items():
        cells = "  ".join(
            f"{t} {' -> '.join(f'{r[s][t]:.3f}' for s in stages)} ({r['teacher'][t]:.3f}, {r['floor'][t]:.3f})"
            for t in r["distilled"]
        )
        recovered = f"  KL {r['kl_recovered']:.3f}" if args.recovery_steps else ""
        print(f"{name:<8}{r['active']:>8.1%}{r['cache']:>7.1%}{r['kl_converted']:>7.3f}  {cells}{recovered}")
    result(**{f"{name}_{s}": f"{r[s]['overall']:.3f}" for name, r in rows.items() for s in stages})


if __name__ == "__main__":
    main()
