"""What a conversion kept and what it saves: the student's divergence from the teacher on held-out teacher text
(`fidelity`), and its parameters and KV cache beside the teacher's (`economics`).

`next_token_kl` is the one divergence: recovery (`recovery.kl_to_teacher`) trains on it, `fidelity` reports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from pipeline.model.config import ModelConfig
from pipeline.model.convert.calibration import pad_batch
from pipeline.model.convert.shapes import ConversionError, TeacherShape


def next_token_kl(
    t_logp_BSV: torch.Tensor, s_logp_BSV: torch.Tensor, mask_BS: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed forward KL(teacher || student) of the next-token distributions after every real token but the last,
    and how many there are. Takes both models' log-probabilities at every position (float32, (B, S, V))."""
    t_logp_BSV, s_logp_BSV = t_logp_BSV[:, :-1], s_logp_BSV[:, :-1]  # the last position predicts nothing here
    valid_BS = mask_BS[:, 1:]
    kl_BS = (t_logp_BSV.exp() * (t_logp_BSV - s_logp_BSV)).sum(-1)
    return kl_BS[valid_BS].sum(), int(valid_BS.sum())


@dataclass
class HeldOutFidelity:
    """`fidelity`'s measurement (the stage stores it as the typed `Fidelity` of conversion.json and metrics)."""

    kl: float  # mean next-token KL(teacher || student) in nats, over the held-out tokens
    student_ppl: float
    teacher_ppl: float
    tokens: int


@torch.no_grad()
def fidelity(teacher, student, sequences: Iterable[Sequence[int]], batch_size: int = 8) -> HeldOutFidelity:
    """How far the student's next-token distribution is from the teacher's on held-out teacher text."""
    kl_sum = s_nll = t_nll = 0.0
    n = 0
    seqs = [list(s) for s in sequences if len(s) > 1]
    if not seqs:
        raise ConversionError("fidelity needs at least one held-out sequence of two or more tokens")
    student.train(False)
    teacher.train(False)
    for start in range(0, len(seqs), batch_size):
        ids_BS, mask_BS = pad_batch(seqs[start : start + batch_size])
        t_logp_BSV = teacher(input_ids=ids_BS, attention_mask=mask_BS.long()).logits.float().log_softmax(-1)
        s_logp_BSV = student(ids_BS).float().log_softmax(-1)
        kl, valid = next_token_kl(t_logp_BSV, s_logp_BSV, mask_BS)
        kl_sum += float(kl)
        valid_BS, target_BS1 = mask_BS[:, 1:], ids_BS[:, 1:, None]
        s_nll -= float(s_logp_BSV[:, :-1].gather(-1, target_BS1).squeeze(-1)[valid_BS].sum())
        t_nll -= float(t_logp_BSV[:, :-1].gather(-1, target_BS1).squeeze(-1)[valid_BS].sum())
        n += valid
    return HeldOutFidelity(kl_sum / n, math.exp(s_nll / n), math.exp(t_nll / n), n)


def economics(student_cfg: ModelConfig, student_params: dict[str, int], teacher: TeacherShape) -> dict[str, float]:
    """What the student costs beside the teacher, per token: parameters touched and KV-cache floats.

    Embedding parameters are the input embedding and the output head (counted once for a tied teacher).
    """
    t = teacher.num_params()
    c = student_cfg
    s_cache = c.n_layers * (c.kv_lora_rank + c.n_rope_heads * c.qk_rope_head_dim)
    t_cache = teacher.n_layers * teacher.kv_width
    s_active = student_params["active"] - student_params["embedding"]
    t_active = t["total"] - t["embedding"]
    return {
        "student_params_total": student_params["total"],
        "student_params_active": student_params["active"],
        "student_params_active_nonembedding": s_active,
        "student_params_embedding": student_params["embedding"],
        "teacher_params_total": t["total"],
        "teacher_params_nonembedding": t_active,
        "teacher_params_embedding": t["embedding"],
        "active_param_ratio": s_active / t_active,
        "student_cache_floats_per_token": s_cache,
        "teacher_cache_floats_per_token": t_cache,
        "cache_ratio": s_cache / t_cache,
    }
