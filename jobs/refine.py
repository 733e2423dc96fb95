"""Ray job entrypoint for stage `refine` alone (its inputs from the cached upstream runs of the same config).

ray job submit --working-dir . -- python -m jobs.refine --config cluster [--set key=value ...]
"""

from jobs import stage_main

if __name__ == "__main__":
    stage_main("refine")
