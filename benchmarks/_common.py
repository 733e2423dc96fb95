"""Shared timing helpers. Each benchmark runs ours and the peer in one process, interleaved round by round so
that drift in the machine's speed (a shared 2-core box) hits both alike; medians are reported."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(REPO))

from pipeline.model.decode_timing import interleaved  # noqa: E402  (the one timing loop, shared with evaluate)

__all__ = ["describe", "device_arg", "interleaved", "result"]


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
