"""Ray job entrypoint for stage `register` alone (its inputs from the cached upstream runs of the same config).

ray job submit --working-dir . -- python -m jobs.register --config cluster [--set key=value ...]
"""

from jobs import stage_main

if __name__ == "__main__":
    stage_main("register")
