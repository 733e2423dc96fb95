"""Knowledge-distillation losses on stored top-k soft targets.

The teacher's distribution at a position is known on its top-k tokens plus one "tail" bucket holding the rest of
its mass. The student's distribution is folded onto the same k + 1 buckets (its probabilities of the k ids, and
one minus their sum), and the divergence is taken between the two (k + 1)-way distributions. With k equal to the
vocabulary the tail is empty and this is exactly the dense KL.

Temperature T softens both sides: the student's logits are divided by T before the fold, and the teacher's bucket
log-probabilities are divided by T and renormalised (treating the tail as one bucket, the one approximation: the
tail's internal shape is not stored). Following Hinton et al., the KD term is scaled by T² so its gradient keeps
its size as T changes. Everything is averaged over completion positions only (`mask_N`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

_LOG_FLOOR = -80.0  # log-probabilities below this are treated as this (exp underflows in float32 anyway)


def student_buckets(logits_NV: torch.Tensor, topk_ids_NK: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The student's log-probabilities on the teacher's k ids and the tail bucket: [N, K + 1].

    The tail is the log-sum-exp of the student's other tokens, not log(1 - top-k mass): a confident student's
    top-k mass rounds to 1 in float32, where log(1 - mass) is -inf and its gradient (0 x inf) poisons every
    weight with NaN. The log-sum-exp is finite and exact however small the tail.
    """
    logq_NV = torch.log_softmax(logits_NV.float() / temperature, dim=-1)
    ids_NK = topk_ids_NK.long()
    logq_NK = logq_NV.gather(-1, ids_NK)
    if ids_NK.unique().numel() >= logq_NV.shape[-1]:  # k covers the vocabulary: nothing is left for the tail
        tail_N1 = logq_NK.new_full((logq_NK.shape[0], 1), float("-inf"))
    else:
        tail_N1 = logq_NV.scatter(-1, ids_NK, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([logq_NK, tail_N1], dim=-1)


def teacher_buckets(
    topk_logprobs_NK: torch.Tensor, tail_logmass_N: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The teacher's stored log-probabilities with the tail bucket, softened by `temperature`: [N, K + 1]."""
    logp = torch.cat([topk_logprobs_NK.float(), tail_logmass_N.float().unsqueeze(-1)], dim=-1)
    return logp if temperature == 1.0 else torch.log_softmax(logp / temperature, dim=-1)


def forward_kl(logp_NB: torch.Tensor, logq_NB: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position: mass-covering; buckets the teacher gives 0 contribute 0."""
    p = logp_NB.exp()
    return torch.where(p > 0, p * (logp_NB - logq_NB.clamp(min=_LOG_FLOOR)), torch.zeros_like(p)).sum(-1)


def reverse_kl(logp_NB: torch.Tensor, logq_NB: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) per position: mode-seeking; the teacher's zeros are floored, not infinite."""
    q = logq_NB.exp()
    return torch.where(q > 0, q * (logq_NB - logp_NB.clamp(min=_LOG_FLOOR)), torch.zeros_like(q)).sum(-1)


def _masked_mean(x_N: torch.Tensor, mask_N: torch.Tensor) -> torch.Tensor:
    m = mask_N.to(x_N.dtype)
    return (x_N * m).sum() / m.sum().clamp(min=1)


@dataclass
class DistillLoss:
    total: torch.Tensor  # alpha * KD + (1 - alpha) * CE
    kd: torch.Tensor
    ce: torch.Tensor


def distill_loss(
    logits_NV: torch.Tensor,
    targets_N: torch.Tensor,
    mask_N: torch.Tensor,
    topk_ids_NK: torch.Tensor | None,
    topk_logprobs_NK: torch.Tensor | None,
    tail_logmass_N: torch.Tensor | None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    kind: Literal["forward_kl", "reverse_kl"] = "forward_kl",
    soft_N: torch.Tensor | None = None,
) -> DistillLoss:
    """The training loss on completion positions: `alpha * KD + (1 - alpha) * CE`.

    Args:
        logits_NV: the student's logits at N positions.
        targets_N: the next token at each position (the accepted completion), for the CE term.
        mask_N: true at completion positions; everything else is ignored.
        topk_ids_NK, topk_logprobs_NK, tail_logmass_N: the teacher's stored targets at the same positions
            (rows under a false mask may hold anything); None for samples without soft targets (the loss is CE).
        alpha: weight of the KD term.
        temperature: softening of both distributions in the KD term (scaled back by T²).
        kind: `forward_kl` (KL(p_teacher || q_student)) or `reverse_kl`.
        soft_N: positions that have teacher targets (default: all of `mask_N`); a batch with none is pure CE.
    """
    ce = _masked_mean(F.cross_entropy(logits_NV.float(), targets_N.long(), reduction="none"), mask_N)
    soft_N = mask_N if soft_N is None else soft_N & mask_N
    if topk_ids_NK is None or topk_logprobs_NK is None or tail_logmass_N is None or not bool(soft_N.any()):
        return DistillLoss(ce, torch.zeros_like(ce), ce)
    logq = student_buckets(logits_NV, topk_ids_NK, temperature)
    logp = teacher_buckets(topk_logprobs_NK, tail_logmass_N, temperature)
    per_position = (forward_kl if kind == "forward_kl" else reverse_kl)(logp, logq)
    kd = _masked_mean(per_position, soft_N) * temperature**2
    return DistillLoss(alpha * kd + (1 - alpha) * ce, kd, ce)
