"""Held-out pass@1 judged over training seeds, not one draw: each setting runs the tiny pipeline once per seed,
and each task's figure is the mean over seeds with its standard error, beside the teacher asked the same way, the
teacher at its best prompt (worked examples) and the constant-answer floor, with what each cell cost.

One run of the tiny preset moves by 0.06-0.08 overall between seeds, so a single run says nothing about a change.
Every cell is a real `moeforge run --config tiny` in one working directory: `generate` (the training traces and
the held-out split) is shared by every cell, `distill` by every cell of the same teacher context, `convert` by
every cell of the same point, and `train` by the cells that differ only in `refine`; a seed sets `train.seed` and
`refine.seed` (the data split and the traces stay fixed, so settings are compared on the same prompts).

The standard error of a task's mean has two parts, both reported:
- over seeds: the spread of the seeds' pass@1 (sample standard deviation / sqrt(seeds)): what one more run moves;
- over questions: the spread of the per-question accuracy pooled over the seeds (each question answered once per
  seed; standard deviation / sqrt(questions)): what another held-out draw would move.
`SE` in the table is the two added in quadrature. The held-out split is larger than the default run's
(`--eval-prompts`, 64 per task by default, against 32) and pooled over the seeds: at 64 questions the
question part is at most 0.0625 for a task (at pass@1 0.5, every seed agreeing) and falls as seeds disagree.
The teacher and the floor are greedy and constant: their SE is the question part alone.

Between two settings, `--compare A:B` counts the (seed, prompt) pairs that A answers right where B did not and the
reverse, with the exact two-sided sign test over those flips.

    .venv/bin/python benchmarks/quality_seeds.py [--workdir DIR] [--seeds 0,1,2] [--settings best,same]
        [--point tiny|target] [--eval-prompts 192] [--compare best:same] [--set KEY=VALUE ...]
        [--setting NAME=KEY=VALUE;KEY=VALUE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import result
from compression_points import POINTS, run_point
from refine_quality import paired, sign_test

from pipeline.artifacts import fetch, read_table
from pipeline.config import load_config
from pipeline.stages.artifact_specs import EVAL_REPORT
from pipeline.stages.results import EvaluationSummary
from pipeline.tracking import Tracker

# Each setting's overrides, applied after the point's and `--set`'s. refine is named in every one, so a cell says
# whether its student was refined whatever the preset's default is.
SETTINGS = {
    "best": ["distill.teacher_context=best", "refine.iterations=0"],
    "same": ["distill.teacher_context=same", "refine.iterations=0"],
    "best+refine": ["distill.teacher_context=best", "refine.iterations=3"],
    "same+refine": ["distill.teacher_context=same", "refine.iterations=3"],
}
MODELS = ("student", "teacher", "teacher_best")


def cell_grades(refs: dict, tracking_uri: str, workdir: Path) -> tuple[dict, dict[str, str]]:
    """Every model's graded answer to every held-out prompt ({model: {prompt id: correct}}) and each prompt's task,
    from the run's `eval_report`."""
    ref = refs["eval_report"]
    rows = read_table(fetch(ref, tracking_uri, workdir), EVAL_REPORT, ref.hash).to_pylist()
    grades: dict[str, dict[str, bool]] = defaultdict(dict)
    for r in rows:
        grades[r["model"]][r["prompt_id"]] = bool(r["correct"])
    return dict(grades), {r["prompt_id"]: r["task"] for r in rows}


def stage_minutes(sets: list[str]) -> dict[str, float]:
    """Minutes of each stage the latest pipeline run really ran (cache hits are not counted)."""
    tracker = Tracker(load_config("tiny", sets).tracking)
    run = tracker.pipeline_runs()[0].info.run_id
    out = {}
    for r in tracker.stage_runs(run):
        if not r.data.tags.get("moeforge.cached_from") and r.info.end_time:
            out[r.info.run_name] = (r.info.end_time - r.info.start_time) / 60_000
    return out


def mean_se(per_seed: list[dict[str, bool]], prompts: list[str]) -> tuple[float, float, float]:
    """(mean pass@1 over seeds, SE over seeds, SE over questions) of one model on `prompts`."""
    by_seed = [sum(g[p] for p in prompts) / len(prompts) for g in per_seed]
    mean = statistics.fmean(by_seed)
    se_seeds = statistics.stdev(by_seed) / math.sqrt(len(by_seed)) if len(by_seed) > 1 else math.nan
    per_question = [sum(g[p] for g in per_seed) / len(per_seed) for p in prompts]
    se_questions = statistics.pstdev(per_question) / math.sqrt(len(prompts))
    return mean, se_seeds, se_questions


def summarize(cells: list[dict], tasks: dict[str, str], model: str = "student") -> dict[str, dict[str, float]]:
    """Per task and overall: mean, SE over seeds, SE over questions, and the two combined."""
    out = {}
    by_task = defaultdict(list)
    for prompt, task in sorted(tasks.items()):
        by_task[task].append(prompt)
    for task, prompts in [*sorted(by_task.items()), ("overall", sorted(tasks))]:
        mean, s_seeds, s_questions = mean_se([c["grades"][model] for c in cells], prompts)
        both = math.sqrt((0.0 if math.isnan(s_seeds) else s_seeds) ** 2 + s_questions**2)
        out[task] = {"mean": mean, "se_seeds": s_seeds, "se_questions": s_questions, "se": both}
    return out


def parse_setting(text: str) -> tuple[str, list[str]]:
    """`NAME=KEY=VALUE;KEY=VALUE` -> (NAME, [KEY=VALUE, ...])."""
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise SystemExit(f"--setting {text!r}: expected NAME=KEY=VALUE;KEY=VALUE")
    return name, [o for o in overrides.split(";") if o]


def line(label: str, figures: dict[str, dict[str, float]], tasks: list[str], cost: str = "") -> str:
    cells = "".join(f"{figures[t]['mean']:>10.3f} ± {figures[t]['se']:.3f}" for t in [*tasks, "overall"])
    return f"{label:<16}{cells}  {cost}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None, help="a working directory to reuse (its stages cached)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default="best,same")
    parser.add_argument("--setting", dest="extra", action="append", default=[], help="NAME=KEY=VALUE;KEY=VALUE")
    parser.add_argument("--point", default="tiny", choices=sorted(POINTS))
    parser.add_argument("--eval-prompts", type=int, default=192, help="held-out prompts (split evenly over tasks)")
    parser.add_argument("--compare", action="append", default=[], help="A:B, the paired sign test of A against B")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="further overrides, every cell")
    args = parser.parse_args()
    settings = dict(SETTINGS) | dict(parse_setting(s) for s in args.extra)
    names = args.settings.split(",")
    if unknown := [n for n in names if n not in settings]:
        raise SystemExit(f"unknown setting(s) {unknown}: known are {sorted(settings)} (add one with --setting)")
    if bad := [c for c in args.compare if not set(c.split(":")) <= set(names) or c.count(":") != 1]:
        raise SystemExit(f"--compare {bad}: expected A:B, two of the settings run ({names})")
    seeds = [int(s) for s in args.seeds.split(",")]
    workdir = args.workdir or tempfile.mkdtemp(prefix="moeforge-seeds-")
    moeforge = str(Path(sys.executable).parent / "moeforge")
    cells: dict[str, list[dict]] = defaultdict(list)
    tasks: dict[str, str] = {}
    floor: EvaluationSummary | None = None
    # seed-major: every setting has its first seed before any has its second, so a run cut short still compares
    for seed in seeds:
        for name in names:
            sets = [
                f"tracking.workdir={workdir}",
                *POINTS[args.point],
                f"data.num_eval_prompts={args.eval_prompts}",
                *args.overrides,
                *settings[name],
                f"train.seed={seed}",
                f"refine.seed={seed}",
            ]
            t0 = time.perf_counter()
            refs, metrics, wd, uri = run_point(moeforge, sets)
            grades, tasks = cell_grades(refs, uri, wd)
            floor = EvaluationSummary.from_metrics(metrics["evaluate"])
            cell = {
                "setting": name,
                "seed": seed,
                "minutes": (time.perf_counter() - t0) / 60,
                "stage_minutes": stage_minutes(sets),
                "grades": grades,
            }
            cells[name].append(cell)
            student = sum(grades["student"].values()) / len(grades["student"])
            stages = " ".join(f"{k} {v:.1f}" for k, v in cell["stage_minutes"].items() if v >= 0.05)
            print(f"{name} seed {seed}: student {student:.3f}, {cell['minutes']:.1f} min ({stages})", flush=True)
    Path(workdir, f"quality_seeds_{'_'.join(names)}.json").write_text(
        json.dumps({"tasks": tasks, "cells": cells}, indent=1)
    )
    assert floor is not None and floor.floor is not None, "an evaluated run with its floor"
    order = sorted(set(tasks.values()))
    print(f"\n{args.point}: held-out pass@1, mean ± SE over seeds {seeds} and {len(tasks)} held-out prompts")
    print(f"{'':<16}" + "".join(f"{t[:17]:>18}" for t in [*order, "overall"]) + "  cost per cell")
    figures = {}
    for name in names:
        figures[name] = summarize(cells[name], tasks)
        minutes = statistics.fmean(c["minutes"] for c in cells[name][1:] or cells[name])
        spent: dict[str, list[float]] = defaultdict(list)  # a stage's minutes in the cells that really ran it
        for c in cells[name]:
            for stage, m in c["stage_minutes"].items():
                spent[stage].append(m)
        ran = ", ".join(f"{s} {statistics.fmean(v):.1f}" for s, v in spent.items() if max(v) >= 0.05)
        print(line(name, figures[name], order, f"{minutes:.1f} min/seed ({ran})"))
    first = cells[names[0]]
    for who in ("teacher", "teacher_best"):
        print(line(who, summarize(first, tasks, who), order, "greedy, deterministic"))
    floors = floor.floor.pass_at_1_by_task
    print(
        f"{'floor':<16}"
        + "".join(f"{floors.get(t, math.nan):>18.3f}" for t in order)
        + f"{floor.floor.pass_at_1:>18.3f}"
    )
    out: dict[str, float | str] = {f"{n}_overall": figures[n]["overall"]["mean"] for n in names}
    out |= {f"{n}_se": figures[n]["overall"]["se"] for n in names}
    for pair in args.compare:
        a, _, b = pair.partition(":")
        flips = [
            paired(ca["grades"]["student"], cb["grades"]["student"]) for ca, cb in zip(cells[a], cells[b], strict=True)
        ]
        gained, lost = sum(f[0] for f in flips), sum(f[1] for f in flips)
        p = sign_test(gained, lost)
        print(
            f"{a} against {b}: +{gained} -{lost} over {len(flips)} seeds x {len(tasks)} prompts (sign test p={p:.3f})"
        )
        out[f"{a}_vs_{b}_p"] = p
    best, teacher = summarize(first, tasks, "teacher_best"), summarize(first, tasks, "teacher")
    main_setting = figures[names[0]]
    beaten = [t for t in order if best[t]["mean"] > floors.get(t, 0.0)]
    out["ge_best_prompt_overall"] = str(main_setting["overall"]["mean"] >= best["overall"]["mean"])
    out["ge_best_prompt_every_task_above_floor"] = str(all(main_setting[t]["mean"] >= best[t]["mean"] for t in beaten))
    out["ge_teacher_every_task"] = str(all(main_setting[t]["mean"] >= teacher[t]["mean"] for t in order))
    out["over_teacher_overall"] = main_setting["overall"]["mean"] - teacher["overall"]["mean"]
    result(**out)


if __name__ == "__main__":
    main()
