"""What refine adds in held-out pass@1: off-policy distillation only (refine off), + on-policy distillation (`opd`),
+ GRPO (`grpo`), + both, at the default student and at the cost-target point, beside the teacher asked the same
way, the teacher at its best prompt (worked examples) and the constant-answer floor, with what each cost.

Every cell is a real `moeforge run --config tiny` in one working directory: `generate`, `distill`, and per point
`convert` and `train` come from the stage cache after the first, so the variants of a point refine the same
trained student and are judged on the same held-out split with the same seeds; only `refine` and `evaluate` rerun.

    .venv/bin/python benchmarks/refine_quality.py [--workdir DIR] [--points tiny,target]
        [--objectives off,opd,grpo,both] [--iterations 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from _common import result
from compression_points import POINTS, run_point

from pipeline.artifacts import fetch, read_table
from pipeline.stages.artifact_specs import EVAL_REPORT
from pipeline.stages.results import EvaluationSummary

OBJECTIVES = {
    "off": ["refine.iterations=0"],  # off-policy distillation alone: the trained student is evaluated
    "opd": ["refine.objective=opd"],
    "grpo": ["refine.objective=grpo"],
    "both": ["refine.objective=both"],
}


def student_grades(refs: dict, tracking_uri: str, workdir: Path) -> dict[str, bool]:
    """The student's graded answer to every held-out prompt (prompt id -> correct), from the run's `eval_report`."""
    ref = refs["eval_report"]
    table = read_table(fetch(ref, tracking_uri, workdir), EVAL_REPORT, ref.hash)
    return {r["prompt_id"]: r["correct"] for r in table.to_pylist() if r["model"] == "student"}


def paired(grades: dict[str, bool], baseline: dict[str, bool]) -> tuple[int, int, float]:
    """Prompts a cell answers right where the baseline did not (gained) and the reverse (lost), with the exact
    two-sided sign test's p-value over those flips: on one held-out split a pass@1 difference means little beside
    how many prompts it is, and whether they could be chance."""
    assert grades.keys() == baseline.keys(), "both cells graded on the same held-out prompts"
    gained = sum(g and not baseline[k] for k, g in grades.items())
    lost = sum(baseline[k] and not g for k, g in grades.items())
    return gained, lost, sign_test(gained, lost)


def sign_test(gained: int, lost: int) -> float:
    """The exact two-sided sign test's p-value of `gained` flips one way against `lost` the other."""
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n if n else 1.0
    return min(1.0, 2 * tail)


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
    parser.add_argument("--iterations", type=int, default=3, help="refine iterations of every cell but `off`")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="further overrides, every cell")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="moeforge-refine-")
    moeforge = str(Path(sys.executable).parent / "moeforge")
    rows: dict[tuple[str, str], dict] = {}
    for point in args.points.split(","):
        for objective in args.objectives.split(","):
            # the cell's objective last: `--set refine.iterations=...` must not turn refine back on for `off`
            sets = [
                f"tracking.workdir={workdir}",
                *POINTS[point],
                f"refine.iterations={args.iterations}",
                *args.overrides,
                *OBJECTIVES[objective],
            ]
            t0 = time.perf_counter()
            refs, metrics, wd, uri = run_point(moeforge, sets)
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
                "grades": student_grades(refs, uri, wd),
            }
            rows[(point, objective)] = row
            print(f"{point}/{objective}: {json.dumps({k: v for k, v in row.items() if k != 'grades'})}", flush=True)
    tasks = [t for t in next(iter(rows.values()))["student"] if t != "overall"]
    print(
        f"\n{'point':<8}{'refine':<7}" + "".join(f"{t[:16]:>18}" for t in tasks) + f"{'overall':>10}"
        f"{'vs off: +gained -lost (sign test p)':>38}  cost"
    )
    for (point, objective), r in rows.items():
        cells = "".join(f"{r['student'][t]:>18.3f}" for t in tasks)
        off = rows.get((point, "off"))
        versus = ""
        if off is not None and objective != "off":
            gained, lost, p = paired(r["grades"], off["grades"])
            versus = f"+{gained} -{lost} (p={p:.2f})"
        print(
            f"{point:<8}{objective:<7}{cells}{r['student']['overall']:>10.3f}{versus:>38}  "
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
