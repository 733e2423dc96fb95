"""Ray job entrypoint for the whole pipeline.

    ray job submit --working-dir . -- python -m jobs.pipeline --config cluster [--set key=value ...]

The job runs the same driver as `moeforge run`: it connects to the cluster in $RAY_ADDRESS (set by Ray for
submitted jobs) and tracks to $MLFLOW_TRACKING_URI when set.
"""

from __future__ import annotations

import sys

from pipeline.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["run", *(sys.argv[1:] if argv is None else argv)], prog_name="jobs.pipeline")


if __name__ == "__main__":
    main()
