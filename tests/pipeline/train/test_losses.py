"""KD losses on top-k targets against dense references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.train.losses import distill_loss, student_buckets, teacher_buckets


def _targets(teacher_logits_NV, k):
    logp_NV = torch.log_softmax(teacher_logits_NV, -1)
    lp_NK, ids_NK = logp_NV.topk(k, -1)
    return ids_NK, lp_NK, logp_NV.scatter(-1, ids_NK, float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_top_k_equals_the_dense_kl(temperature):
    torch.manual_seed(0)
    N, V = 12, 50
    student_NV, teacher_NV = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    ids, lp, tail = _targets(teacher_NV, V)
    assert torch.isinf(tail).all()  # nothing outside the top V
    mask = torch.ones(N, dtype=torch.bool)
    logq = torch.log_softmax(student_NV / temperature, -1)
    logp = torch.log_softmax(teacher_NV / temperature, -1)
    dense_fwd = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1).mean() * temperature**2
    dense_rev = F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1).mean() * temperature**2
    targets = torch.zeros(N, dtype=torch.long)
    fwd = distill_loss(student_NV, targets, mask, ids, lp, tail, alpha=1.0, temperature=temperature).kd
    rev = distill_loss(
        student_NV, targets, mask, ids, lp, tail, alpha=1.0, temperature=temperature, kind="reverse_kl"
    ).kd
    torch.testing.assert_close(fwd, dense_fwd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rev, dense_rev, rtol=1e-5, atol=1e-5)


def test_tail_bucket_completes_both_distributions_and_gradients_are_finite():
    torch.manual_seed(1)
    student = torch.randn(8, 100, requires_grad=True)
    ids, lp, tail = _targets(torch.randn(8, 100), 5)
    torch.testing.assert_close(teacher_buckets(lp, tail).exp().sum(-1), torch.ones(8))
    torch.testing.assert_close(student_buckets(student, ids).exp().sum(-1), torch.ones(8))
    loss = distill_loss(student, torch.randint(0, 100, (8,)), torch.ones(8, dtype=torch.bool), ids, lp, tail)
    loss.total.backward()
    assert torch.isfinite(student.grad).all() and loss.kd > 0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_a_student_whose_tail_mass_rounds_to_zero_still_gets_finite_gradients(kind):
    """A converted student starts confident: its top-k mass is 1 in float32. The loss and its gradient stay
    finite (the tail was log(1 - 1) = -inf, and 0 x inf turned every gradient into NaN)."""
    torch.manual_seed(3)
    teacher = torch.randn(4, 50)
    ids, lp, tail = _targets(teacher, 3)
    student = torch.full((4, 50), -60.0)
    student.scatter_(1, ids, 60.0)  # every other token is e^-120 below the top k
    student.requires_grad_(True)
    loss = distill_loss(student, ids[:, 0], torch.ones(4, dtype=torch.bool), ids, lp, tail, kind=kind)
    loss.total.backward()
    assert torch.isfinite(loss.total) and torch.isfinite(student.grad).all()
    assert student_buckets(student, ids)[:, -1].max() < -100  # the tail is tiny, and still a number


def test_only_completion_positions_count_and_alpha_mixes():
    torch.manual_seed(2)
    student, targets = torch.randn(6, 30), torch.randint(0, 30, (6,))
    ids, lp, tail = _targets(torch.randn(6, 30), 4)
    mask = torch.tensor([False, False, True, True, True, False])
    base = distill_loss(student, targets, mask, ids, lp, tail, alpha=0.3)
    garbage = student.clone()
    garbage[~mask] = 1e4  # anything under a false mask is ignored
    same = distill_loss(garbage, targets, mask, ids, lp, tail, alpha=0.3)
    torch.testing.assert_close(base.total, same.total)
    torch.testing.assert_close(base.ce, F.cross_entropy(student[mask], targets[mask]))
    torch.testing.assert_close(base.total, 0.3 * base.kd + 0.7 * base.ce)
    sft = distill_loss(student, targets, mask, None, None, None, alpha=0.3)  # no soft targets: plain CE
    torch.testing.assert_close(sft.total, base.ce)
