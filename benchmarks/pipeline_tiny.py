"""Whole-pipeline wall time on the embedded default: `moeforge run --config tiny`, cold and then warm.

Cold: a fresh working directory (new MLflow store, no stage cache) on this machine, with the teacher already
dequantized in the user cache (a one-time step of ~20 s the first time the wheel's GGUF is used). Warm: the
identical command again, every stage a cache hit. Both are the CLI as a user runs it, in a subprocess, timed from
launch to exit (Ray start included). The last lines of the cold run's output (pass@1 table, registry decision)
are printed too.

    .venv/bin/python benchmarks/pipeline_tiny.py [--config tiny] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, result


def timed_run(cwd: str, config: str, overrides: list[str]) -> tuple[float, str]:
    cmd = [str(Path(sys.executable).parent / "moeforge"), "run", "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "COLUMNS": "160", "PYTHONPATH": str(REPO)},
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cwd:
        cold, out = timed_run(cwd, args.config, args.overrides)
        lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("(")]
        print("\n".join(lines[-20:]))
        warm, out = timed_run(cwd, args.config, args.overrides)
        print(out.strip().splitlines()[-1])
    print(f"cold {cold:.0f} s, warm {warm:.1f} s")
    result(cold_s=cold, warm_s=warm, cold_minutes=cold / 60)


if __name__ == "__main__":
    main()
