"""One rank of `refine`'s learner: an update of the student on a batch of its own graded, teacher-scored samples.

Plain PyTorch: `actors/learner.py` builds one per Ray Train worker each iteration, tests build them directly. The
update first runs the batch once without gradients under the weights that sampled it: the old log-probs of the
clipped ratio (recomputed here rather than taken from the rollout, so the ratio starts at exactly 1 whatever the
rollout's decode numerics), the starting student's log-probs for the KL term, and the metrics (reverse KL to the
teacher, entropy) together with the experts each token was routed to. It then takes `updates_per_iteration`
optimizer steps, one per part of the batch, and finally routes the batch again, so `routing_agreement` says how
many (token, layer) expert choices the update changed.

With `refine.router: frozen` the router's weights and its balance biases take no part in the update, and there is
no balance-bias update: the experts a token reaches move only as far as the hidden states feeding the router do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import RefineConfig
from pipeline.model import ModelConfig, Transformer
from pipeline.model.moe import Gate
from pipeline.train.policy_losses import opd_reverse_kl, refine_loss, token_logprobs


@dataclass
class PolicySample:
    """One completion of the student, as the learner trains on it (C completion tokens, K teacher top-k)."""

    tokens: list[int]  # the student's prompt, then its completion
    start: int  # index of the first completion token
    advantage: float  # the completion's group-normalised reward (`policy_losses.group_advantages`)
    topk_ids: np.ndarray | None  # int [C, K]: the teacher's top-k at each completion token; None: not scored
    topk_logprobs: np.ndarray | None  # float [C, K]
    tail_logmass: np.ndarray | None  # float [C]


@dataclass(frozen=True)
class LearnerMetrics:
    """One iteration's update, over every rank: tokens summed, the rest per token (or per rank for the loss)."""

    learner_tokens: float  # completion tokens trained on
    reverse_kl: float  # KL(student || teacher) per scored completion token
    entropy: float  # the student's per-token entropy at temperature 1
    clip_fraction: float  # tokens whose importance ratio was clipped
    kl_to_start: float  # KL(student || starting student) per token; nan without a reference
    routing_agreement: float  # (token, layer) expert choices the update left unchanged
    update_loss: float


def to_batch(samples: list[PolicySample], k: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded tensors of a list of samples: tokens [B, T], and at the completion positions (N of them, in
    row order) the sampled tokens, advantages, whether the teacher scored them, and its top-k."""
    T = max(len(s.tokens) for s in samples)
    tokens_BT = torch.zeros(len(samples), T, dtype=torch.long)
    mask_BT = torch.zeros(len(samples), T, dtype=torch.bool)  # true at positions that predict a completion token
    targets, adv, soft, ids, lps, tails = [], [], [], [], [], []
    for b, s in enumerate(samples):
        C = len(s.tokens) - s.start
        tokens_BT[b, : len(s.tokens)] = torch.tensor(s.tokens)
        mask_BT[b, s.start - 1 : len(s.tokens) - 1] = True
        targets.append(torch.tensor(s.tokens[s.start :]))
        adv.append(torch.full((C,), float(s.advantage)))
        scored = s.topk_ids is not None and s.topk_logprobs is not None and s.tail_logmass is not None
        soft.append(torch.full((C,), scored))
        ids.append(torch.as_tensor(s.topk_ids, dtype=torch.long) if scored else torch.zeros(C, k, dtype=torch.long))
        lps.append(torch.as_tensor(s.topk_logprobs, dtype=torch.float32) if scored else torch.zeros(C, k))
        tails.append(torch.as_tensor(s.tail_logmass, dtype=torch.float32) if scored else torch.zeros(C))
    out = {
        "tokens_BT": tokens_BT,
        "mask_BT": mask_BT,
        "tokens_N": torch.cat(targets),
        "advantages_N": torch.cat(adv),
        "soft_N": torch.cat(soft),
        "topk_ids_NK": torch.cat(ids),
        "topk_logprobs_NK": torch.cat(lps),
        "tail_logmass_N": torch.cat(tails),
    }
    return {k_: v.to(device) for k_, v in out.items()}


class CompletionLogits(torch.nn.Module):
    """The student's logits at the completion positions only, as a module's forward (so DDP can wrap it): the
    output head over a 49k vocabulary is most of the memory, and the prompt positions need none."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        h_BTD = self.model.trunk(tokens_BT)
        return self.model.head(self.model.norm(h_BTD)[mask_BT])


class RoutingRecorder:
    """The experts every MoE layer picked for each token during the forwards it is active for."""

    def __init__(self, model: Transformer):
        self.gates = [m for m in model.modules() if isinstance(m, Gate)]
        self.ids: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> RoutingRecorder:
        self.ids = []
        self._handles = [
            g.register_forward_hook(lambda _m, _a, out: self.ids.append(out[1].detach())) for g in self.gates
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def routing_agreement(before: list[torch.Tensor], after: list[torch.Tensor], mask_BT: torch.Tensor) -> tuple[int, int]:
    """(same, total): the (token, layer) pairs at completion positions whose set of top-k experts is unchanged."""
    keep_N = mask_BT.reshape(-1)
    same = total = 0
    for a_NK, b_NK in zip(before, after, strict=True):
        a, b = a_NK[keep_N].sort(-1).values, b_NK[keep_N].sort(-1).values
        same += int((a == b).all(-1).sum())
        total += a.shape[0]
    return same, total


def freeze_router(model: Transformer) -> None:
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        gate.weight.requires_grad_(False)


class PolicyLearner:
    """One learner rank for one iteration.

    Args:
        model_cfg: the student's architecture.
        cfg: the refine settings (objective, coefficients, lr, router, updates per iteration).
        state: the student's weights at the start of the iteration (the ones that sampled the batch).
        optimizer_state: AdamW's state carried over from the previous iteration (None at the first).
        reference_state: the starting student's weights, for the KL term (None: the term is not needed).
        rank, world: this rank and the learner's size (torch.distributed initialised when world > 1).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: RefineConfig,
        state: dict[str, torch.Tensor],
        optimizer_state: dict | None = None,
        reference_state: dict[str, torch.Tensor] | None = None,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
    ):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, torch.device(device)
        self.model = Transformer(model_cfg)
        self.model.load_state_dict(state)
        self.model.to(self.device).train()
        if cfg.router == "frozen":
            freeze_router(self.model)
        self.reference = None
        if reference_state is not None:
            self.reference = Transformer(model_cfg)
            self.reference.load_state_dict(reference_state)
            self.reference.to(self.device).eval().requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.forward: torch.nn.Module = CompletionLogits(self.model)
        if world > 1:
            from pipeline.train.replica import data_parallel

            self.forward = data_parallel(self.forward, self.device)

    def parts(self, samples: list[PolicySample]) -> list[list[PolicySample]]:
        """The batch cut into `updates_per_iteration` parts, one optimizer step each (every rank the same count)."""
        n = self.cfg.updates_per_iteration
        if len(samples) < n:
            raise ValueError(
                f"learner rank {self.rank} has {len(samples)} samples for {n} updates per iteration: raise "
                "refine.prompts_per_iteration or group_size, or lower refine.updates_per_iteration or num_workers"
            )
        return [list(p) for p in np.array_split(np.array(samples, dtype=object), n)]

    @torch.no_grad()
    def _measure(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Old and reference log-probs, and the sums behind the metrics, under the weights that sampled."""
        with RoutingRecorder(self.model) as routes:
            logits_NV = CompletionLogits(self.model)(batch["tokens_BT"], batch["mask_BT"])
        t = self.cfg.temperature
        old_N = token_logprobs(logits_NV, batch["tokens_N"], t)
        if self.reference is not None:
            ref_N = token_logprobs(
                CompletionLogits(self.reference)(batch["tokens_BT"], batch["mask_BT"]), batch["tokens_N"], t
            )
        else:
            ref_N = old_N
        logq_NV = torch.log_softmax(logits_NV.float(), -1)
        rkl_N = opd_reverse_kl(logits_NV, batch["topk_ids_NK"], batch["topk_logprobs_NK"], batch["tail_logmass_N"])
        soft = batch["soft_N"].float()
        sums = {
            "tokens": torch.tensor(float(batch["tokens_N"].numel())),
            "scored_tokens": soft.sum(),
            "reverse_kl": (rkl_N * soft).sum(),
            "entropy": -(logq_NV.exp() * logq_NV).sum(-1).sum(),
        }
        return {"old_logp_N": old_N, "ref_logp_N": ref_N, **sums}, routes.ids

    def update(self, samples: list[PolicySample], k: int) -> LearnerMetrics:
        """Train on this rank's samples; returns the iteration's metrics, summed over ranks where they add up."""
        parts = [to_batch(p, k, self.device) for p in self.parts(samples)]
        measured = [self._measure(b) for b in parts]
        sums = {key: sum(m[key] for m, _ in measured) for key in ("tokens", "scored_tokens", "reverse_kl", "entropy")}
        losses, clipped, kl_ref = [], 0.0, 0.0
        for batch, (m, _) in zip(parts, measured, strict=True):
            logits_NV = self.forward(batch["tokens_BT"], batch["mask_BT"])
            loss = refine_loss(
                self.cfg.objective,
                logits_NV,
                batch["tokens_N"],
                torch.ones_like(batch["soft_N"]),
                old_logp_N=m["old_logp_N"],
                ref_logp_N=m["ref_logp_N"],
                advantages_N=batch["advantages_N"],
                topk_ids_NK=batch["topk_ids_NK"],
                topk_logprobs_NK=batch["topk_logprobs_NK"],
                tail_logmass_N=batch["tail_logmass_N"],
                soft_N=batch["soft_N"],
                temperature=self.cfg.temperature,
                clip_eps=self.cfg.clip_eps,
                kl_coef=self.cfg.kl_coef,
                opd_coef=self.cfg.opd_coef,
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
            self.optimizer.step()
            n = float(batch["tokens_N"].numel())
            losses.append(float(loss.total.detach()))
            clipped += float(loss.clip_fraction) * n
            kl_ref += float(loss.kl_ref.detach()) * n
        same = total = 0
        with torch.no_grad():
            for batch, (_, before) in zip(parts, measured, strict=True):
                with RoutingRecorder(self.model) as after:
                    CompletionLogits(self.model)(batch["tokens_BT"], batch["mask_BT"])
                s, t = routing_agreement(before, after.ids, batch["mask_BT"])
                same, total = same + s, total + t
        totals = torch.tensor(
            [float(sums["tokens"]), float(sums["scored_tokens"]), float(sums["reverse_kl"]), float(sums["entropy"]),
             clipped, kl_ref, float(same), float(total), float(np.mean(losses))]
        )  # fmt: skip
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)
        tokens, scored, rkl, entropy, clipped_t, kl_t, same_t, total_t, loss_sum = totals.tolist()
        return LearnerMetrics(
            learner_tokens=tokens,
            reverse_kl=rkl / max(scored, 1.0),
            entropy=entropy / max(tokens, 1.0),
            clip_fraction=clipped_t / max(tokens, 1.0),
            # measured against the starting student only when there is one (kl_coef > 0 with grpo or both)
            kl_to_start=kl_t / max(tokens, 1.0) if self.reference is not None else float("nan"),
            routing_agreement=same_t / max(total_t, 1.0),
            update_loss=loss_sum / self.world,
        )

    def state(self) -> dict[str, Any]:
        """What the next iteration starts from: the weights (router biases included) and AdamW's state."""
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
        }
