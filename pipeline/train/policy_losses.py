"""Losses on the student's own samples (stage `refine`): on-policy distillation, GRPO, or both.

A refine iteration samples G completions per prompt from the current student (a "group"), grades each with the
verifiers (the reward) and has the teacher score the student's tokens. The update then minimises one of:

- `opd`, on-policy distillation: the per-token reverse KL, KL(student || teacher), at every completion position
  the student itself produced (GKD, MiniLLM, Qwen3). It is taken on the same k + 1 buckets as `distill`'s soft
  targets (the teacher's top-k ids and one tail bucket, `losses.student_buckets`), so its gradient is exact over
  the buckets instead of a one-sample estimate, and it is zero, with a zero gradient, where the student already
  matches the teacher. No reward is used.
- `grpo` (DeepSeekMath): each completion's reward minus its group's mean, over the group's standard deviation,
  is the advantage of every one of its tokens; the loss is PPO's clipped surrogate on the ratio of the current
  policy to the one that sampled, plus β × a KL term to the starting student (the k3 estimator, unbiased and
  non-negative).
- `both`: the GRPO loss plus λ × the reverse KL, i.e. the reward advantage minus λ × the per-token reverse KL.

Every term is a mean over all completion tokens of the batch (the token-level mean of DAPO and Dr. GRPO): a
per-sequence mean first would weigh a token of a short answer above one of a long answer, which biases the policy
towards long wrong answers and short right ones.

Shapes: N is the completion positions of a batch, flattened; P prompts x G completions per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.train.losses import reverse_kl, student_buckets, teacher_buckets

Objective = Literal["opd", "grpo", "both"]


def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, over the group's (sample) standard deviation.

    A group whose rewards are all equal (all right or all wrong) teaches nothing about which attempt was better:
    its advantages are 0 (not NaN, which a one-completion group's undefined deviation would give).
    """
    rewards_PG = rewards_PG.float()
    if rewards_PG.shape[1] < 2:
        return torch.zeros_like(rewards_PG)
    mean_P1 = rewards_PG.mean(dim=1, keepdim=True)
    std_P1 = rewards_PG.std(dim=1, keepdim=True)
    return (rewards_PG - mean_P1) / (std_P1 + eps)


def token_logprobs(logits_NV: torch.Tensor, tokens_N: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(token) at each position under the logits softened by `temperature` (the rollout's), [N]."""
    logp_NV = torch.log_softmax(logits_NV.float() / temperature, dim=-1)
    return logp_NV.gather(-1, tokens_N.long().unsqueeze(-1)).squeeze(-1)


def clipped_surrogate(
    logp_N: torch.Tensor, old_logp_N: torch.Tensor, advantages_N: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, as a loss (negated), and where the clip was active (no gradient there).

    ratio = π / π_old. The minimum of ratio × A and clip(ratio, 1 ± ε) × A stops a step from pushing a token's
    probability further once it has moved ε past the sampling policy in the advantage's direction.
    """
    ratio_N = torch.exp(logp_N - old_logp_N)
    unclipped_N = ratio_N * advantages_N
    clipped_N = ratio_N.clamp(1 - clip_eps, 1 + clip_eps) * advantages_N
    return -torch.minimum(unclipped_N, clipped_N), (clipped_N < unclipped_N)


def kl_to_reference(logp_N: torch.Tensor, ref_logp_N: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(π || π_ref) per sampled token: r - log r - 1 with r = π_ref / π; >= 0, 0 where equal."""
    log_ratio_N = ref_logp_N - logp_N
    return torch.exp(log_ratio_N) - log_ratio_N - 1


def opd_reverse_kl(
    logits_NV: torch.Tensor, topk_ids_NK: torch.Tensor, topk_logprobs_NK: torch.Tensor, tail_logmass_N: torch.Tensor
) -> torch.Tensor:
    """KL(student || teacher) per position on the teacher's k + 1 buckets, at temperature 1, [N]."""
    logq_NB = student_buckets(logits_NV, topk_ids_NK)
    logp_NB = teacher_buckets(topk_logprobs_NK, tail_logmass_N)
    return reverse_kl(logp_NB, logq_NB)


@dataclass
class RefineLoss:
    total: torch.Tensor  # what the learner minimises
    policy: torch.Tensor  # the clipped surrogate (0 for `opd`)
    kl_ref: torch.Tensor  # KL to the starting student (reported for every objective; weighted by β in grpo/both)
    reverse_kl: torch.Tensor  # KL(student || teacher) (reported for every objective; the loss of opd)
    clip_fraction: torch.Tensor  # share of tokens whose ratio was clipped


def _mean(x_N: torch.Tensor, mask_N: torch.Tensor) -> torch.Tensor:
    m = mask_N.to(x_N.dtype)
    return (x_N * m).sum() / m.sum().clamp(min=1)


def refine_loss(
    objective: Objective,
    logits_NV: torch.Tensor,
    tokens_N: torch.Tensor,
    mask_N: torch.Tensor,
    *,
    old_logp_N: torch.Tensor,
    ref_logp_N: torch.Tensor,
    advantages_N: torch.Tensor,
    topk_ids_NK: torch.Tensor,
    topk_logprobs_NK: torch.Tensor,
    tail_logmass_N: torch.Tensor,
    temperature: float,
    soft_N: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    opd_coef: float = 1.0,
) -> RefineLoss:
    """The refine update's loss on a batch of the student's own completions.

    Args:
        logits_NV: the current student's logits at the N completion positions (the ones predicting `tokens_N`).
        tokens_N: the tokens the student sampled there; `mask_N` true at positions that count.
        old_logp_N: log-probs of those tokens under the policy that sampled them (the rollout's weights, at the
            rollout temperature), for the ratio.
        ref_logp_N: the same under the starting student, for the KL term.
        advantages_N: each token's completion's group advantage (`group_advantages`).
        topk_ids_NK, topk_logprobs_NK, tail_logmass_N: the teacher's scores of the student's tokens.
        soft_N: where the teacher did score them (default: everywhere); elsewhere the reverse KL is not taken.
        temperature: the rollout's sampling temperature; the ratio and KL terms compare the policy at it, since that
            is the distribution the tokens came from. The reverse KL to the teacher is taken at temperature 1.
        clip_eps: PPO's ε. kl_coef: β. opd_coef: λ, the weight of the reverse KL in `both`.
    """
    logp_N = token_logprobs(logits_NV, tokens_N, temperature)
    scored_N = mask_N if soft_N is None else mask_N & soft_N
    rkl = _mean(opd_reverse_kl(logits_NV, topk_ids_NK, topk_logprobs_NK, tail_logmass_N), scored_N)
    kl_ref = _mean(kl_to_reference(logp_N, ref_logp_N), mask_N)
    surrogate_N, clipped_N = clipped_surrogate(logp_N, old_logp_N, advantages_N.float(), clip_eps)
    policy = _mean(surrogate_N, mask_N)
    clip_fraction = _mean(clipped_N.float(), mask_N).detach()
    if objective == "opd":
        return RefineLoss(rkl, torch.zeros_like(rkl), kl_ref, rkl, clip_fraction)
    grpo = policy + kl_coef * kl_ref
    total = grpo if objective == "grpo" else grpo + opd_coef * rkl
    return RefineLoss(total, policy, kl_ref, rkl, clip_fraction)
