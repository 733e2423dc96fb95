"""What refine adds in held-out pass@1: off-policy distillation only (refine off), + on-policy distillation (`opd`),
+ GRPO (`grpo`), + both, at the default student and at the cost-target point, beside the teacher asked the same
way, the teacher at its best prompt (worked examples) and the constant-answer floor, with what each cost.

Every cell is a real `moeforge run --config tiny` in one working directory: `generate`, `distill`, and per point
`convert` and `train` come from the stage cache after the first, so the variants of a point refine the same
trained student and are judged on the same held-out split with the same seeds; only `refine` and `evaluate` rerun.

    .venv/bin/python benchmarks/refine_quality.py [--workdir DIR] [--points tiny,target]
        [--objectives off,opd,grpo,both] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import result
from compression_points import POINTS, run_point

from pipeline.stages.artifact_specs import EvaluationSummary

OBJECTIVES = {
    "off": ["refine.iterations=0"],  # off-policy distillation alone: the trained student is evaluated
    "opd": ["refine.objective=opd"],
    "grpo": ["refine.objective=grpo"],
    "both": ["refine.objective=both"],
}


def targets(rows: dict, point: str) -> dict[str, str]:
    """The issue's targets, met or missed, from a point's cells."""
    out = {}
    both, off = rows.get((point, "both")), rows.get((point, "off"))
    if both is None:
        return out
    best, teacher, floor, student = both["teacher_best"], both["teacher"], both["floor"], both["student"]
    tasks = [t for t in student if t != "overall"]
    if point == "tiny":
        beaten = [t for t in tasks if best[t] > floor[t]]
        out["every_task_ge_best_prompt"] = str(all(student[t] >= best[t] for t in beaten))
        out["overall_ge_best_plus_0.05"] = str(student["overall"] >= best["overall"] + 0.05)
        if (letters := "letter_counting") in student:
            out["letter_counting_ge_floor_plus_0.10"] = str(student[letters] >= floor[letters] + 0.1)
    else:
        out[f"{point}_every_task_ge_teacher"] = str(all(student[t] >= teacher[t] for t in tasks))
    if off is not None:
        out[f"{point}_gain_over_off"] = f"{student['overall'] - off['student']['overall']:+.3f}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None, help="reuse a tiny run's working directory (its stages cached)")
    parser.add_argument("--points", default="tiny,target")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="further overrides, every cell")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="moeforge-refine-")
    moeforge = str(Path(sys.executable).parent / "moeforge")
    rows: dict[tuple[str, str], dict] = {}
    for point in args.points.split(","):
        for objective in args.objectives.split(","):
            sets = [f"tracking.workdir={workdir}", *POINTS[point], *OBJECTIVES[objective], *args.overrides]
            t0 = time.perf_counter()
            _, metrics, _, _ = run_point(moeforge, sets)
            ev = EvaluationSummary.from_metrics(metrics["evaluate"])
            assert ev is not None and ev.floor is not None, "an evaluated run"
            tasks = sorted(ev.student.pass_at_1_by_task)

            def per_task(r, tasks=tasks) -> dict[str, float]:
                return {t: r.pass_at_1_by_task.get(t, float("nan")) for t in tasks} | {"overall": r.pass_at_1}

            refine = metrics.get("refine", {})
            row = {
                "student": per_task(ev.student),
                "teacher": per_task(ev.teacher),
                "teacher_best": per_task(ev.teacher_best),
                "floor": per_task(ev.floor),
                "iterations": refine.get("iterations", 0),
                "refine_minutes": refine.get("minutes", 0.0),
                "minutes": (time.perf_counter() - t0) / 60,
            }
            rows[(point, objective)] = row
            print(f"{point}/{objective}: {json.dumps(row)}", flush=True)
    tasks = [t for t in next(iter(rows.values()))["student"] if t != "overall"]
    print(f"\n{'point':<8}{'refine':<7}" + "".join(f"{t[:16]:>18}" for t in tasks) + f"{'overall':>10}  cost")
    for (point, objective), r in rows.items():
        cells = "".join(f"{r['student'][t]:>18.3f}" for t in tasks)
        print(
            f"{point:<8}{objective:<7}{cells}{r['student']['overall']:>10.3f}  "
            f"{r['iterations']:.0f} iterations, {r['refine_minutes']:.1f} min refine"
        )
    for point in dict.fromkeys(p for p, _ in rows):
        r = next(v for (p, _), v in rows.items() if p == point)
        for who in ("teacher", "teacher_best", "floor"):
            cells = "".join(f"{r[who][t]:>18.3f}" for t in tasks)
            print(f"{point:<8}{who[:6]:<7}{cells}{r[who]['overall']:>10.3f}")
    figures = {f"{p}_{o}": f"{r['student']['overall']:.3f}" for (p, o), r in rows.items()}
    for point in dict.fromkeys(p for p, _ in rows):
        figures.update(targets(rows, point))
    result(**figures)


if __name__ == "__main__":
    main()
