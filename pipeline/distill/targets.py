"""Soft targets: what the student trains on, token by token, and how it is stored.

The training text of a sample is the student's conversation (instruction + question, see `data/prompts.py`) in
the chat template, followed by the accepted completion and the end-of-turn token. For every completion position
the teacher's top-k next-token ids and log-probabilities are kept, plus the log of the mass outside them, so the
KD loss can treat "everything else" as one bucket. Alignment follows the usual shift: the targets stored at
position i describe token i + 1, and `loss_mask[i]` is true exactly where token i + 1 is a completion token.

The teacher reads the completion's token ids after its own context (`distill.teacher_context`, `teacher_view`):
by default its best prompt, the task's worked examples, which the student never sees. Its rows are aligned to the
completion tokens, so they sit at the student's positions whatever it read before them.

One Parquet row per sample with list columns; the teacher's tokenizer is fingerprinted, and a student whose
tokenizer differs is refused (its token ids would mean different strings).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from pipeline.data.prompts import TeacherContext, chat_token_ids, student_messages, teacher_context_ids
from pipeline.teacher.base import SoftTargets


class TokenizerMismatch(ValueError):
    """The student's tokenizer is not the one the soft targets were computed with."""


def encode(tokenizer, question: str, completion: str) -> tuple[list[int], int]:
    """(token ids of the training text, index of the first completion token)."""
    prompt = chat_token_ids(tokenizer, student_messages(question))
    answer = [*tokenizer.encode(completion, add_special_tokens=False), tokenizer.eos_token_id]
    return prompt + answer, len(prompt)


def teacher_view(
    tokenizer, task: str, question: str, token_ids: list[int], start: int, context: TeacherContext
) -> tuple[list[int], int]:
    """What the teacher scores of a training text (`token_ids`, completion from `start`): its context's token ids
    (`prompts.teacher_context_ids`), then the same completion ids; and the index of the completion's first token in
    it. The teacher's rows for it are the student's rows too, one per completion token: only the context differs.
    With `same` this is the training text itself."""
    context_ids = teacher_context_ids(tokenizer, task, question, context)
    return context_ids + token_ids[start:], len(context_ids)


def loss_mask(length: int, start: int) -> list[bool]:
    return [start - 1 <= i < length - 1 for i in range(length)]


def row(sample_id: str, task: str, token_ids: list[int], start: int, targets: SoftTargets | None) -> dict:
    """One stored row; `targets` None keeps only the sequence (sequence-level distillation, plain SFT)."""
    return {
        "sample_id": sample_id,
        "task": task,
        "token_ids": token_ids,
        "loss_mask": loss_mask(len(token_ids), start),
        "topk_ids": targets.topk_ids.tolist() if targets else [],
        "topk_logprobs": targets.topk_logprobs.tolist() if targets else [],
        "tail_logmass": targets.tail_logmass.tolist() if targets else [],
    }


def topk_mass(targets: SoftTargets) -> np.ndarray:
    """Share of the teacher's probability covered by the stored top k, per position."""
    return np.exp(targets.topk_logprobs.astype(np.float64)).sum(-1)


class TeacherAgreement:
    """How far the soft targets agree with the accepted completions they are stored beside, per task: the share
    of completion tokens where the teacher's top-1 is the accepted token, and its mean log-prob of them. Where the
    teacher disagrees, the KD half of the loss pulls against the CE half (what `distill.teacher_context` is for)."""

    def __init__(self) -> None:
        self.counts: dict[str, np.ndarray] = {}  # task -> [tokens, top-1 matches, tokens with a log-prob, their sum]

    def add(self, task: str, targets: SoftTargets, completion: list[int]) -> None:
        c = self.counts.setdefault(task, np.zeros(4))
        accepted = np.asarray(completion)
        c[0] += len(accepted)
        c[1] += int((targets.topk_ids[:, 0] == accepted).sum())
        if targets.token_logprobs is not None:
            c[2] += len(accepted)
            c[3] += float(targets.token_logprobs.astype(np.float64).sum())

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for task, c in [*sorted(self.counts.items()), ("", sum(self.counts.values(), np.zeros(4)))]:
            suffix = f".{task}" if task else ""
            if c[0]:
                out[f"teacher_top1_agreement{suffix}"] = float(c[1] / c[0])
            if c[2]:
                out[f"accepted_token_logprob{suffix}"] = float(c[3] / c[2])
        return out


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what token ids mean: the vocabulary (with added tokens) and the special tokens."""
    blob = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_tokenizer(tokenizer, fingerprint: str, where: str = "the soft targets") -> None:
    """Refuse a student tokenizer that differs from the teacher's."""
    mine = tokenizer_fingerprint(tokenizer)
    if mine != fingerprint:
        raise TokenizerMismatch(
            f"tokenizer mismatch: {where} were computed with tokenizer {fingerprint}, the student's is {mine} "
            f"({len(tokenizer)} tokens); the student must use the teacher's tokenizer (saved with the targets)"
        )
