"""Shared timing helpers. Each benchmark runs ours and the peer in one process, interleaved round by round so
that drift in the machine's speed (a shared 2-core box) hits both alike; medians are reported."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(REPO))


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int = 10,
    warmup: int = 2,
    setup: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn each round (on CUDA, each call is timed to
    the end of its kernels, not to their launch). `setup[name]`, where given, runs untimed before each call."""

    def sync() -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()

    setup = setup or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            if name in setup:
                setup[name]()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def device_arg(value: str) -> torch.device:
    """`--device`: cpu, cuda, cuda:N — refused at once if this machine has no such device."""
    device = torch.device(value)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {value}: this machine has no CUDA device")
    return device


def describe(device: torch.device | None = None) -> str:
    where = (
        torch.cuda.get_device_name(device)
        if device is not None and device.type == "cuda"
        else f"{torch.get_num_threads()} threads, {platform.machine()}"
    )
    return f"torch {torch.__version__}, {where}, python {platform.python_version()}"


def result(**figures: float | str) -> None:
    """The benchmark's last line: `RESULT key=value ...`."""
    print("RESULT " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
