"""Ray job entrypoint for stage `convert` alone: the student built from the teacher's weights (its calibration
samples from the cached `generate` run of the same config).

    ray job submit --working-dir . -- python -m jobs.convert --config cluster [--set key=value ...]
"""

from jobs import stage_main

if __name__ == "__main__":
    stage_main("convert")
