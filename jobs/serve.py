"""Ray job entrypoint that deploys the OpenAI-compatible Serve app and returns (Serve keeps it running).

    ray job submit --working-dir . -- python -m jobs.serve --config cluster [--model models:/NAME@ALIAS]

Same as `moeforge serve --detach`: the model is resolved (an alias pinned to its current version) where the job
runs, with $MLFLOW_TRACKING_URI when set.
"""

from __future__ import annotations

import sys

from jobs import run_command


def main(argv: list[str] | None = None) -> None:
    run_command("jobs.serve", ["serve", "--detach", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
