"""Ray job entrypoint for the whole pipeline.

    ray job submit --working-dir . -- python -m jobs.pipeline --config cluster [--set key=value ...]

The job runs the same driver as `moeforge run`: it connects to the cluster in $RAY_ADDRESS (set by Ray for
submitted jobs) and tracks to $MLFLOW_TRACKING_URI when set.
"""

from __future__ import annotations

import sys

from jobs import run_command


def main(argv: list[str] | None = None) -> None:
    run_command("jobs.pipeline", ["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
