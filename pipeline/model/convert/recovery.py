"""Recovery: the converted student taught to speak like the teacher again, before task distillation.

A conversion (this package's `convert`) loses what the pruned layers, the dropped rope pairs, the low-rank latent
and top-k routing carried. Recovery distils the teacher back into the student on general teacher-written text (the
teacher's samples of the training prompts, accepted or not, as in conversion's calibration) with the
full-vocabulary forward KL at every position, computed online with both models in this process, the way Minitron
retrains a pruned model against its unpruned parent and MHA2MLA fine-tunes after converting attention. It sits
between stage `convert` (which calls it when `convert.recovery_steps` > 0) and task distillation on the accepted
traces (stage `train`), so each stage's student can be judged: converted, recovered, distilled.

Plain torch, no Ray. Shape suffixes: the legend in `pipeline/model/__init__.py`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pipeline.model.convert.calibration import pad_batch
from pipeline.model.convert.measurement import next_token_kl
from pipeline.model.moe import update_router_biases


@dataclass
class RecoveryReport:
    steps: int
    tokens: int  # KL positions trained on, over all steps
    seconds: float
    losses: list[float] = field(default_factory=list)  # KL (nats/token) of each step's batch, before its update


def kl_to_teacher(teacher, student, ids_BS: torch.Tensor, mask_BS: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean forward KL(teacher || student) of the next-token distributions after every real token but the last."""
    with torch.no_grad():
        t_logp_BSV = teacher(input_ids=ids_BS, attention_mask=mask_BS.long()).logits.float().log_softmax(-1)
    s_logp_BSV = student(ids_BS).float().log_softmax(-1)
    kl, n = next_token_kl(t_logp_BSV, s_logp_BSV, mask_BS)
    return kl / max(n, 1), n


def recover(
    teacher,
    student,
    sequences: Sequence[Sequence[int]],
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    warmup_steps: int = 2,
    grad_clip: float = 1.0,
    seed: int = 0,
) -> RecoveryReport:
    """Train `student` in place for `steps` AdamW steps to match `teacher` on `sequences` (token ids).

    Batches are drawn without replacement, reshuffled each epoch (seeded); the learning rate warms up linearly,
    then stays at `lr` (a few hundred steps at most here, too short for a decay to matter). The MoE router biases
    get the auxiliary-loss-free update after every step, as in training, and the sequence-wise balance loss is
    added to the KL.
    """
    seqs = [list(s) for s in sequences if len(s) > 1]
    if not seqs:
        raise ValueError("recovery needs at least one teacher sequence of two or more tokens")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"recovery needs steps >= 1 and batch_size >= 1, got steps={steps} batch_size={batch_size}")
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    was_training = teacher.training, student.training
    teacher.train(False)
    student.train(True)
    order: list[int] = []
    report = RecoveryReport(steps, 0, 0.0)
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            if len(order) < batch_size:
                order += rng.sample(range(len(seqs)), len(seqs))
            ids_BS, mask_BS = pad_batch([seqs[i] for i in order[:batch_size]])
            del order[:batch_size]
            kl, n = kl_to_teacher(teacher, student, ids_BS, mask_BS)
            loss = kl + student.balance_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
            optimizer.step()
            schedule.step()
            update_router_biases(student, student.cfg.bias_update_speed)
            report.losses.append(kl.detach().item())
            report.tokens += n
    finally:
        teacher.train(was_training[0])
        student.train(was_training[1])
    report.seconds = time.perf_counter() - t0
    return report
