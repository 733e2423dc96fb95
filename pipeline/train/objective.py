"""The student's training objective on packed soft targets (what every replica minimises).

The trunk runs over the whole window, but the output head is applied only at completion positions: the KD term
needs the student's full-vocabulary log-softmax there, and nowhere else (prompt positions carry no loss). Total:
`kd_alpha * KD + (1 - kd_alpha) * CE` + the MoE sequence-wise balance loss (+ `mtp_lambda` * the MTP
cross-entropy on completion positions when the model has an MTP block).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.model import Transformer
from pipeline.model.loss import linear_cross_entropy
from pipeline.train.losses import distill_loss
from pipeline.train.packing import PackedBatch


@dataclass
class StepLoss:
    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    balance: torch.Tensor
    mtp: torch.Tensor | None
    tokens: int  # completion positions the loss was taken over


def to_tensors(batch: PackedBatch, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in vars(batch).items()}


def objective(model: Transformer, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> StepLoss:
    """The loss of one packed batch (tensors from `to_tensors`)."""
    tokens_BT, mask_BT = batch["tokens_BT"], batch["mask_BT"]
    h_BTD = model.trunk(tokens_BT)
    hidden_ND = model.norm(h_BTD)[mask_BT]
    logits_NV = model.head(hidden_ND)
    soft_N = batch["soft_BT"][mask_BT]
    losses = distill_loss(
        logits_NV,
        batch["targets_BT"][mask_BT],
        torch.ones_like(soft_N),
        batch["topk_ids_BTK"][mask_BT],
        batch["topk_logprobs_BTK"][mask_BT],
        batch["tail_logmass_BT"][mask_BT],
        alpha=cfg.kd_alpha,
        temperature=cfg.kd_temperature,
        kind=cfg.kd_loss,
        soft_N=soft_N,
    )
    mtp = None
    if model.mtp is not None and tokens_BT.shape[1] > 1:
        D = h_BTD.shape[-1]
        ignore = torch.where(mask_BT, batch["targets_BT"], torch.full_like(batch["targets_BT"], -100))
        mtp = linear_cross_entropy(
            model.mtp_hidden(h_BTD, tokens_BT).reshape(-1, D), model.head.weight, ignore[:, 1:].reshape(-1), -100
        )
    balance = model.balance_loss()
    total = losses.total + balance + (model.cfg.mtp_lambda * mtp if mtp is not None else 0)
    return StepLoss(total, losses.kd, losses.ce, balance, mtp, int(mask_BT.sum()))


class ObjectiveModule(torch.nn.Module):
    """The objective as a module's `forward`, so `DistributedDataParallel` can wrap it and sync gradients.

    Use `DDP(ObjectiveModule(model, cfg), find_unused_parameters=True, broadcast_buffers=False)`: routed experts
    that received no token this step have no gradient, and router biases stay in sync through the all-reduced
    expert counts of `update_router_biases`, not by copying rank 0's.
    """

    def __init__(self, model: Transformer, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        return objective(self.model, batch, self.cfg)
