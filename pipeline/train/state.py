"""One replica's training state and step, checkpointable to the step.

Plain PyTorch, no Ray: every `Replica` (replica.py; one per Ray Train worker) builds a `TrainState`, wraps
the model in DDP, and reports `state_dict()` as its checkpoint. Everything a resumed run needs to continue exactly
where it stopped is in the state: weights and router biases, AdamW moments, the LR schedule, the step, the
position in the input stream (epoch, windows trained on; `stream.py`) and the RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from pipeline.config import TrainConfig
from pipeline.model import Transformer, update_router_biases
from pipeline.train.objective import StepLoss, objective, to_tensors
from pipeline.train.stream import WindowStream


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the peak over `warmup_steps`, then cosine down to `min_lr_ratio` of it at `max_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def accumulate(run: Callable[[dict], StepLoss], batch: dict[str, torch.Tensor], micro_batch_size: int) -> StepLoss:
    """Backward through `batch` in slices of `micro_batch_size` sequences; the batch's loss, detached.

    Each slice's loss is scaled by its share of the batch's completion positions, so the summed gradients are the
    gradient of the loss over the whole batch: exactly for its KD, CE and MTP terms (means over positions) when
    every completion position has teacher targets, as `distill` writes them; the sequence-wise balance term, and
    KD where only some positions have targets, are weighted the same way, close to the whole batch's."""
    size = batch["tokens_BT"].shape[0]
    if micro_batch_size >= size:
        loss = run(batch)
        loss.total.backward()
        return _detached(loss)
    positions = batch["mask_BT"].sum().clamp(min=1)
    parts: list[tuple[float, StepLoss]] = []
    for start in range(0, size, micro_batch_size):
        micro = {k: v[start : start + micro_batch_size] for k, v in batch.items()}
        share = float(micro["mask_BT"].sum() / positions)
        loss = run(micro)
        (loss.total * share).backward()
        parts.append((share, _detached(loss)))

    def weighted(field: str) -> torch.Tensor:
        return sum((w * getattr(part, field) for w, part in parts), torch.zeros(()))

    mtp = weighted("mtp") if all(part.mtp is not None for _, part in parts) else None
    tokens = sum(part.tokens for _, part in parts)
    return StepLoss(weighted("total"), weighted("kd"), weighted("ce"), weighted("balance"), mtp, tokens)


def _detached(loss: StepLoss) -> StepLoss:
    mtp = loss.mtp.detach() if loss.mtp is not None else None
    return StepLoss(loss.total.detach(), loss.kd.detach(), loss.ce.detach(), loss.balance.detach(), mtp, loss.tokens)


class TrainState:
    """Model, optimizer, schedule, step and data position of one replica."""

    def __init__(self, model: Transformer, cfg: TrainConfig, data: WindowStream):
        self.model, self.cfg, self.data = model, cfg, data
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0
        self.last_counts = torch.zeros(0, 0)  # (MoE layers, experts) tokens routed in the last step, all replicas

    # ------------------------------------------------------------------------------------------------ data

    @property
    def epoch(self) -> int:
        return self.data.epoch

    @property
    def position(self) -> int:
        """Windows of this epoch already trained on."""
        return self.data.position

    def next_batch(self) -> dict[str, torch.Tensor]:
        return to_tensors(self.data.next_batch(self.cfg.batch_size), next(self.model.parameters()).device)

    # ------------------------------------------------------------------------------------------------ step

    def train_step(
        self,
        all_reduce: Callable[[torch.Tensor], object] | None = None,
        forward: Callable[[dict], StepLoss] | None = None,
    ) -> dict[str, float]:
        """One optimizer step; `forward` lets a DDP wrapper run the objective (default: the plain model).

        With `train.micro_batch_size` below `batch_size` the batch is run in slices, their gradients summed before
        the step (gradient accumulation): each slice's loss is weighted by its share of the batch's completion
        positions, so the step's gradient is the whole batch's, while only one slice's activations are held."""
        self.model.train()
        run = forward or (lambda b: objective(self.model, b, self.cfg))
        batch = self.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        loss = accumulate(run, batch, self.cfg.micro_batch_size or self.cfg.batch_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        counts_LE = update_router_biases(self.model, self.model.cfg.bias_update_speed, all_reduce)
        self.last_counts = counts_LE
        self.step += 1
        share_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp(min=1)
        out = {
            "loss": loss.total.item(),
            "kd": loss.kd.item(),
            "ce": loss.ce.item(),
            "balance": loss.balance.item(),
            "grad_norm": float(grad_norm),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "tokens": loss.tokens,
            "expert_share_max": float(share_LE.max()) if share_LE.numel() else 0.0,
        }
        if loss.mtp is not None:
            out["mtp"] = loss.mtp.item()
        return out

    def run(self, steps: int, **kwargs) -> Iterator[dict[str, float]]:
        for _ in range(steps):
            yield self.train_step(**kwargs)

    # ------------------------------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.data.seek(state["epoch"], state["position"])
        torch.set_rng_state(state["torch_rng"])
