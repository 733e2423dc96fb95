"""Model FLOPs utilisation: the FLOPs of a training step and the peak they are measured against.

The FLOP count is the model's own (`Transformer.flops_per_token`); see docs/architecture.md for the definition.
"""

from __future__ import annotations

import math
import time

import torch

# Dense bf16 peak of common accelerators (FLOP/s), for the MFU estimate; see docs/architecture.md.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "V100": 125e12,
    "T4": 65e12,
}


def flops_per_step(per_token: tuple[float, float], trunk_tokens: int, head_tokens: int) -> float:
    """Model FLOPs of one training step from the model's (trunk, head) FLOPs per token
    (`Transformer.flops_per_token`): the trunk over every position, the head at completion positions only."""
    trunk, head = per_token
    return trunk_tokens * trunk + head_tokens * head


def peak_flops(device: torch.device, configured: float | None) -> tuple[float, str]:
    """The per-worker peak MFU is measured against, and where it came from."""
    if configured:
        return configured, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} dense bf16 datasheet"
    # CPU: no datasheet to trust; the fp32 matmul throughput these threads actually reach (best of 3)
    a = torch.randn(1024, 1024)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best, f"measured fp32 matmul on {torch.get_num_threads()} CPU threads"
