"""The dtype a student answers in (evaluation, serving), chosen from what the device can do.

`float32` is always exact and always available. `bfloat16` halves the bytes a decode step reads, which is what
bounds decoding at small batch, but only pays where the hardware multiplies bf16 natively: on CUDA devices that
support it, and on CPUs with AVX512-BF16 or AMX-BF16 (x86) or the BF16 extension (Arm). Elsewhere torch emulates
bf16 matrix products through fp32 at a loss, so an explicit `bfloat16` there is refused with the reason rather than
run slowly in silence. `auto` picks bf16 where it is native and fp32 elsewhere, and says which it chose and why.

CPU features are read at run time (`torch.cpu.get_capabilities()`): machines of one cluster differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipeline.model.config import InferenceDtype

log = logging.getLogger(__name__)

__all__ = ["InferenceDtype", "Precision", "log_precision", "native_bf16_cpu_features", "resolve_precision"]
# the CPU capabilities (names as torch.cpu.get_capabilities() reports them) that multiply bf16 matrices natively
NATIVE_BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")


def native_bf16_cpu_features(capabilities: dict | None = None) -> list[str]:
    """The native bf16 matrix features this CPU has (empty: none); `capabilities` as torch reports them."""
    caps = torch.cpu.get_capabilities() if capabilities is None else capabilities
    return [name for name in NATIVE_BF16_CPU_FEATURES if caps.get(name)]


@dataclass(frozen=True)
class Precision:
    """The resolved inference dtype and why it was chosen (for logs, MLflow params and model cards)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_precision(
    setting: InferenceDtype, device: str | torch.device, cpu_capabilities: dict | None = None
) -> Precision:
    """The dtype for `setting` on `device`. Raises ValueError for `bfloat16` where the device has no native bf16.

    `cpu_capabilities` replaces this CPU's detected features (as `torch.cpu.get_capabilities()` reports them), to
    decide for another machine.
    """
    device = torch.device(device)
    if setting == "float32":
        return Precision(torch.float32, "float32 as set")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        where = f"CUDA device {torch.cuda.get_device_name(device)}"
        missing = f"{where} does not support bf16"
        found = f"{where} supports bf16"
    elif device.type == "cpu":
        features = native_bf16_cpu_features(cpu_capabilities)
        native = bool(features)
        missing = "this CPU has no native bf16 matrix support (no AVX512-BF16, AMX-BF16 or Arm BF16)"
        found = f"this CPU has {', '.join(features)}"
    else:
        native, missing, found = False, f"bf16 support on {device.type} is not known", ""
    if setting == "bfloat16":
        if not native:
            raise ValueError(
                f"inference dtype bfloat16 refused: {missing}, so bf16 would be emulated, slower than float32; "
                "set the dtype to float32 or auto"
            )
        return Precision(torch.bfloat16, f"bfloat16 as set ({found})")
    if setting != "auto":
        raise ValueError(f"inference dtype {setting!r}: expected one of auto, float32, bfloat16")
    if native:
        return Precision(torch.bfloat16, f"auto chose bfloat16: {found}")
    return Precision(torch.float32, f"auto chose float32: {missing}")


def log_precision(precision: Precision, what: str) -> Precision:
    """Say what was chosen (never silent), and hand it back."""
    log.info("%s runs in %s (%s)", what, precision.name, precision.reason)
    return precision
