"""What a refine iteration learns from: which training prompts it draws, the student's sampled completions
(`Rollout`), their verifier rewards (`grade`) and the learner's view of them (`policy_samples`).

The stage (`pipeline/stages/refine.py`) orchestrates: the rollout actors sample, the teacher's actors score, the
learner group updates. This module holds the plain data and functions in between, testable without Ray.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data.sources import Prompt
from pipeline.train.policy_learner import PolicySample


def iteration_prompts(n: int, per_iteration: int, iteration: int, seed: int) -> list[int]:
    """Indices of the training prompts of an iteration: consecutive slices of a seeded permutation per epoch, so
    every prompt is used once before any is used twice, and an iteration redone draws the same prompts."""
    out = []
    for position in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        epoch, offset = divmod(position, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[offset]))
    return out


@dataclass
class Rollout:
    """One sampled completion and what the iteration learned about it."""

    prompt: Prompt
    group: int  # index of its prompt in the iteration
    prompt_ids: list[int]  # the student's conversation
    tokens: list[int]  # the completion, its end-of-turn token included when it stopped
    finish_reason: str
    text: str = ""
    reward: float = 0.0
    targets: Any = None  # the teacher's SoftTargets of the completion tokens (None: not scored)


def grade(rollouts: list[Rollout], tokenizer, extractors) -> None:
    """Each completion's reward: 1 when `evaluate` would count it correct (it stopped on its own, its answer was
    found and the task's verifier accepts it), else 0."""
    from pipeline.data.generation import Generation
    from pipeline.data.rejection import judge

    eos = tokenizer.eos_token_id
    for x in rollouts:
        x.text = tokenizer.decode([t for t in x.tokens if t != eos], skip_special_tokens=True)
        gen = Generation(x.text, len(x.prompt_ids), len(x.tokens), x.finish_reason, 0.0)
        x.reward = 1.0 if judge(x.prompt, gen, extractors, threshold=1.0, canonical=False).accepted else 0.0


def policy_samples(rollouts: list[Rollout], advantages_PG: torch.Tensor) -> list[PolicySample]:
    """The learner's view of the rollouts: tokens, completion start, advantage, the teacher's top-k."""
    seen: dict[int, int] = defaultdict(int)
    out = []
    for x in rollouts:
        j = seen[x.group]
        seen[x.group] += 1
        t = x.targets
        out.append(
            PolicySample(
                x.prompt_ids + x.tokens,
                len(x.prompt_ids),
                float(advantages_PG[x.group, j]),
                None if t is None else t.topk_ids,
                None if t is None else t.topk_logprobs,
                None if t is None else t.tail_logmass,
            )
        )
    return out
