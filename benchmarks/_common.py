"""Shared timing helpers for the benchmarks (each benchmark runs ours and the peer in one process)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object], warmup: int = 3, repeat: int = 10) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def describe() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
            f"python {platform.python_version()}")
