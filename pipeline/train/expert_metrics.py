"""How the MoE routers spread tokens over experts: per-layer load statistics, the full share matrix, biases.

`counts_LE` are the tokens routed to each expert of each MoE layer in a step (all replicas), as
`update_router_biases` returns them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.model import Transformer, load_imbalance
from pipeline.model.moe import Gate


def gates(model: Transformer) -> list[tuple[str, str, Gate]]:
    """(module name, layer index, router) of every MoE layer, in layer order."""
    return [(name, name.split(".")[1], m) for name, m in model.named_modules() if isinstance(m, Gate)]


def router_biases(model: Transformer) -> dict[str, torch.Tensor]:
    """Every router's load-balancing bias, by state-dict name (a copy on CPU)."""
    return {f"{name}.bias": gate.bias.detach().cpu().clone() for name, _, gate in gates(model)}


def shares(model: Transformer, counts_LE: torch.Tensor) -> Iterator[tuple[str, Gate, torch.Tensor]]:
    """(layer, router, share of routed tokens per expert) per MoE layer."""
    for (_, layer, gate), counts_E in zip(gates(model), counts_LE, strict=True):
        yield layer, gate, counts_E.double() / counts_E.sum().clamp(min=1)


def expert_metrics(model: Transformer, counts_LE: torch.Tensor) -> dict[str, float]:
    """Per MoE layer: share of routed tokens per expert (min, max, coefficient of variation) and router-bias norm."""
    out: dict[str, float] = {}
    for layer, gate, share_E in shares(model, counts_LE):
        out[f"expert_load.l{layer}.min"] = float(share_E.min())
        out[f"expert_load.l{layer}.max"] = float(share_E.max())
        out[f"expert_load.l{layer}.cv"] = load_imbalance(share_E)
        out[f"router_bias_norm.l{layer}"] = float(gate.bias.norm())
    return out


def expert_shares(model: Transformer, counts_LE: torch.Tensor) -> dict[str, float]:
    """The full layer x expert share matrix as metrics (`expert_share.l<layer>.e<expert>`), for heatmaps."""
    return {
        f"expert_share.l{layer}.e{e}": float(s)
        for layer, _, share_E in shares(model, counts_LE)
        for e, s in enumerate(share_E)
    }
