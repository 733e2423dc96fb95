"""`python -m jobs.<name>` entrypoints for `ray job submit` (and `moeforge submit`, and KubeRay RayJobs).

    ray job submit --working-dir . -- python -m jobs.pipeline --config cluster [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config cluster

`jobs.pipeline` (pipeline.py) is the whole DAG; `jobs.<stage>` (generate.py, distill.py, convert.py, train.py,
refine.py, evaluate.py, register.py, serve.py) runs one stage alone, taking its inputs from the cached runs of
the stages before it (same config, same code), as `moeforge run --only <stage>` does. Each reads $RAY_ADDRESS
(set by Ray for submitted jobs) and $MLFLOW_TRACKING_URI from the environment.
"""

from __future__ import annotations

import sys

STAGE_JOBS = ("generate", "distill", "convert", "train", "refine", "evaluate", "register")


def run_command(prog: str, args: list[str]) -> None:
    """Run `moeforge <args>` as program `prog` (its exit code is the job's)."""
    from pipeline.cli import app

    app(args, prog_name=prog)


def stage_main(stage: str, argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    run_command(f"jobs.{stage}", ["run", "--only", stage, *args])
