"""What the teacher backends share: the context check on prompts, and the soft targets of scoring. Their
completions are `pipeline.data.generation.Generation`s."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.generation import Generation


def split_over_context(
    prompts: list[list[int]], max_new_tokens: int, max_context: int
) -> tuple[list[Generation | None], list[int]]:
    """Flag prompts that cannot fit the context with `max_new_tokens` more; return (results, indices to run)."""
    results: list[Generation | None] = [None] * len(prompts)
    for i, p in enumerate(prompts):
        if len(p) + max_new_tokens > max_context:
            results[i] = Generation(
                "",
                len(p),
                0,
                "bad_prompt",
                0.0,
                error=(
                    f"prompt too long: {len(p)} tokens + max_new_tokens {max_new_tokens} exceed the teacher's "
                    f"context of {max_context}"
                ),
            )
    return results, [i for i, r in enumerate(results) if r is None]


@dataclass
class SoftTargets:
    """The teacher's next-token distribution at each scored position, cut to its top k.

    Row j describes the token that follows position `start + j` of the sequence, i.e. token `start + j + 1`.
    """

    topk_ids: np.ndarray  # int32 [positions, k]
    topk_logprobs: np.ndarray  # float32 [positions, k], log-softmax over the full vocabulary, descending
    tail_logmass: np.ndarray  # float32 [positions], log of the probability mass outside the top k (-inf: none)
    # float32 [positions]: the log-prob of the token that does follow (the scored sequence's own), top-k or not
    token_logprobs: np.ndarray | None = None


@dataclass(frozen=True)
class TeacherCapabilities:
    """What a loaded teacher can do, so stages ask for a capability, never for a backend.

    `score`: top-k log-probs of given token sequences (what `distill` needs for logit KD); `generation_top_logprobs`:
    how many top log-probs it returns per generated token (0: none); `how` says by which route, and `refused` why a
    route the server offers cannot be used (e.g. its tokenizer is not the local one).
    """

    score: bool
    generation_top_logprobs: int
    how: str
    refused: str | None = None
