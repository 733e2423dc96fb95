"""Recovery on a small random Llama teacher: a lossy conversion moves back towards the teacher on text it never saw."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.convert import calibrate, convert, fidelity, kl_to_teacher, pad_batch, recover
from pipeline.model.moe import Gate
from tests.pipeline.model.convert.test_convert import llama, lossless, sequences


def lossy_student(teacher):
    cfg = lossless(qk_rope_head_dim=4, kv_lora_rank=8, n_activated_experts=1)
    return convert(teacher, cfg, calibrate(teacher, sequences(24)))[0]


def test_recovery_lowers_the_held_out_divergence_and_keeps_the_routers_balancing():
    teacher = llama()
    student = lossy_student(teacher)
    held_out = sequences(8, seed=99)
    before = fidelity(teacher, student, held_out).kl
    biases = [g.bias.clone() for g in student.modules() if isinstance(g, Gate)]
    texts = sequences(32, seed=5)
    report = recover(teacher, student, texts, steps=24, lr=1e-3, batch_size=4)
    after = fidelity(teacher, student, held_out).kl
    assert after < 0.8 * before, (before, after)
    assert len(report.losses) == 24 and all(0 <= kl < float("inf") for kl in report.losses)
    assert sum(report.losses[-5:]) < sum(report.losses[:5])
    assert report.tokens == 3 * sum(len(s) - 1 for s in texts)  # 24 batches of 4: every text three times
    moved = [
        not torch.equal(b, g.bias)
        for b, g in zip(biases, (g for g in student.modules() if isinstance(g, Gate)), strict=True)
    ]
    assert any(moved)  # the auxiliary-loss-free update ran after the steps
    assert not teacher.training and not any(p.grad is not None for p in teacher.parameters())


def test_recovery_names_what_it_cannot_train_on():
    teacher = llama()
    student = lossy_student(teacher)
    with pytest.raises(ValueError, match="two or more tokens"):
        recover(teacher, student, [[5]], steps=1)
    with pytest.raises(ValueError, match="steps >= 1"):
        recover(teacher, student, sequences(2), steps=0)


def test_recovery_trains_on_the_divergence_fidelity_reports():
    teacher = llama()
    student = lossy_student(teacher)
    held_out = sequences(8, seed=99)
    kl, n = kl_to_teacher(teacher, student.eval(), *pad_batch(held_out))
    reported = fidelity(teacher, student, held_out)
    assert n == reported.tokens and kl.item() == pytest.approx(reported.kl, rel=1e-6)
