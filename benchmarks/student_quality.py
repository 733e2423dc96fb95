"""The student beside its baselines, read from a finished pipeline run's `evaluate` and `convert` stages.

No model runs here: the numbers are those the pipeline measured and logged to MLflow (the held-out pass@1 of
teacher, teacher at its best prompt, student and the constant-answer floor, per task and overall; the student's
costs beside the teacher's). Each target of the student issue is printed as met or MISSED with its numbers.

    .venv/bin/python benchmarks/student_quality.py [--config tiny] [--set key=value ...] [--run RUN_ID]

Without --run, the latest pipeline run of the config's tracking store and experiment that reached `evaluate`.
"""

from __future__ import annotations

import argparse
import math
import sys

from _common import result

from pipeline.config import load_config
from pipeline.tracking import Tracker


def stage_metrics(
    tracker: Tracker, run_id: str | None, stage: str = "evaluate", metric: str = "student.pass_at_1"
) -> tuple[str, dict[str, dict[str, float]]]:
    """(pipeline run id, {stage: metrics}) of the given run, or of the latest one whose `stage` logged `metric`
    (by default: the latest with an evaluation)."""
    candidates = [run_id] if run_id else [r.info.run_id for r in tracker.pipeline_runs()]
    for rid in candidates:
        metrics = {}
        for r in tracker.stage_runs(rid):  # a cache hit's metrics live on the run that produced its outputs
            source = r.data.tags.get("moeforge.cached_from")
            metrics[r.info.run_name] = tracker.client.get_run(source).data.metrics if source else r.data.metrics
        if metric in metrics.get(stage, {}):
            return rid, metrics
    sys.exit(f"no pipeline run whose {stage} logged {metric} in this tracking store: run `moeforge run` first")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run", default=None, help="a pipeline run id (default: the latest evaluated one)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    rid, m = stage_metrics(Tracker(cfg.tracking), args.run)
    ev, conv = m["evaluate"], m.get("convert", {})
    tasks = sorted(k.rsplit(".", 1)[1] for k in ev if k.startswith("student.pass_at_1."))
    print(f"pipeline run {rid}")
    print(f"{'held-out pass@1':<20}{'teacher':>9}{'teacher best':>14}{'student':>9}{'floor':>8}  targets")
    misses = []
    for task in [*tasks, None]:
        key = f".pass_at_1.{task}" if task else ".pass_at_1"
        t, tb, s, f = (ev.get(f"{who}{key}", math.nan) for who in ("teacher", "teacher_best", "student", "floor"))
        checks = [("student >= teacher", s >= t)]
        if task:
            checks += [("student >= floor + 0.10", s >= f + 0.10)]
            if args.config != "tiny":
                checks += [("student >= teacher best", s >= tb)]
        verdict = ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in checks)
        misses += [f"{task or 'overall'}: {name}" for name, ok in checks if not ok]
        print(f"{task or 'overall':<20}{t:>9.3f}{tb:>14.3f}{s:>9.3f}{f:>8.3f}  {verdict}")
    active, cache = conv.get("active_param_ratio", math.nan), conv.get("cache_ratio", math.nan)
    print(
        f"active non-embedding parameters per token: {active:.1%} of the teacher's (target <= 50%: "
        f"{'met' if active <= 0.5 else 'MISSED'}); KV cache per token: {cache:.1%} (target <= 25%: "
        f"{'met' if cache <= 0.25 else 'MISSED'}); KL to the teacher before training: "
        f"{conv.get('kl_to_teacher', math.nan):.3f} nats/token"
    )
    misses += [name for name, ok in (("active params", active <= 0.5), ("cache", cache <= 0.25)) if not ok]
    print(f"targets missed: {len(misses)}" + (f" ({'; '.join(misses)})" if misses else ""))
    result(
        student_pass_at_1=f"{ev['student.pass_at_1']:.3f}",
        teacher_pass_at_1=f"{ev['teacher.pass_at_1']:.3f}",
        teacher_best_pass_at_1=f"{ev.get('teacher_best.pass_at_1', math.nan):.3f}",
        floor=f"{ev.get('floor.pass_at_1', math.nan):.3f}",
        active_param_ratio=f"{active:.3f}",
        cache_ratio=f"{cache:.3f}",
        kl_to_teacher=f"{conv.get('kl_to_teacher', math.nan):.3f}",
        targets_missed=len(misses),
    )


if __name__ == "__main__":
    main()
