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
from collections.abc import Callable

from _common import result

from pipeline.config import load_config
from pipeline.stages.results import Economics, EvaluationSummary, Fidelity, PassAt1
from pipeline.tracking import Tracker


def evaluated(metrics: dict[str, float]) -> bool:
    return EvaluationSummary.from_metrics(metrics) is not None


def stage_metrics(
    tracker: Tracker,
    run_id: str | None,
    stage: str = "evaluate",
    logged: Callable[[dict[str, float]], bool] = evaluated,
) -> tuple[str, dict[str, dict[str, float]]]:
    """(pipeline run id, {stage: metrics}) of the given run, or of the latest one whose `stage` `logged` what the
    caller needs (by default: the latest with an evaluation)."""
    candidates = [run_id] if run_id else [r.info.run_id for r in tracker.pipeline_runs()]
    for rid in candidates:
        metrics = {}
        for r in tracker.stage_runs(rid):  # a cache hit's metrics live on the run that produced its outputs
            source = r.data.tags.get("moeforge.cached_from")
            metrics[r.info.run_name] = tracker.client.get_run(source).data.metrics if source else r.data.metrics
        if logged(metrics.get(stage, {})):
            return rid, metrics
    sys.exit(f"no pipeline run whose {stage} logged its results in this tracking store: run `moeforge run` first")


def pass_at_1(result: PassAt1 | None, task: str | None) -> float:
    """pass@1 of a model or the floor on `task` (None: overall); nan when it was not graded."""
    value = result.pass_at_1_on(task) if result else None
    return math.nan if value is None else value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run", default=None, help="a pipeline run id (default: the latest evaluated one)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    rid, m = stage_metrics(Tracker(cfg.tracking), args.run)
    ev = EvaluationSummary.from_metrics(m["evaluate"])
    assert ev is not None  # stage_metrics found a run that logged it
    fidelity, costs = Fidelity.from_metrics(m.get("convert", {})), Economics.from_metrics(m.get("convert", {}))
    print(f"pipeline run {rid}")
    print(f"{'held-out pass@1':<20}{'teacher':>9}{'teacher best':>14}{'student':>9}{'floor':>8}  targets")
    misses = []
    for task in [*sorted(ev.student.pass_at_1_by_task), None]:
        t, tb, s, f = (pass_at_1(who, task) for who in (ev.teacher, ev.teacher_best, ev.student, ev.floor))
        checks = [("student >= teacher", s >= t)]
        if task:
            checks += [("student >= floor + 0.10", s >= f + 0.10)]
            if args.config != "tiny":
                checks += [("student >= teacher best", s >= tb)]
        verdict = ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in checks)
        misses += [f"{task or 'overall'}: {name}" for name, ok in checks if not ok]
        print(f"{task or 'overall':<20}{t:>9.3f}{tb:>14.3f}{s:>9.3f}{f:>8.3f}  {verdict}")
    active, cache = (costs.active_param_ratio, costs.cache_ratio) if costs else (math.nan, math.nan)
    kl = fidelity.kl_to_teacher if fidelity else math.nan
    print(
        f"active non-embedding parameters per token: {active:.1%} of the teacher's (target <= 50%: "
        f"{'met' if active <= 0.5 else 'MISSED'}); KV cache per token: {cache:.1%} (target <= 25%: "
        f"{'met' if cache <= 0.25 else 'MISSED'}); KL to the teacher before training: "
        f"{kl:.3f} nats/token"
    )
    misses += [name for name, ok in (("active params", active <= 0.5), ("cache", cache <= 0.25)) if not ok]
    print(f"targets missed: {len(misses)}" + (f" ({'; '.join(misses)})" if misses else ""))
    result(
        student_pass_at_1=f"{ev.student.pass_at_1:.3f}",
        teacher_pass_at_1=f"{ev.teacher.pass_at_1:.3f}",
        teacher_best_pass_at_1=f"{pass_at_1(ev.teacher_best, None):.3f}",
        floor=f"{pass_at_1(ev.floor, None):.3f}",
        active_param_ratio=f"{active:.3f}",
        cache_ratio=f"{cache:.3f}",
        kl_to_teacher=f"{kl:.3f}",
        targets_missed=len(misses),
    )


if __name__ == "__main__":
    main()
