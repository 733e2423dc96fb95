"""The refine losses: on-policy distillation's reverse KL, GRPO's advantages, clipping and KL term."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.model import Transformer
from pipeline.model.config import model_preset
from pipeline.model.generate import SamplingParams, generate
from pipeline.train.policy_losses import (
    clipped_surrogate,
    group_advantages,
    kl_to_reference,
    refine_loss,
    token_logprobs,
)

V = 64
CFG = model_preset(
    "toy", vocab_size=V, dim=32, n_layers=2, n_heads=2, inter_dim=64, max_seq_len=64,
    moe_inter_dim=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
)  # fmt: skip
K = 8


def teacher_scores(logits_NV: torch.Tensor, k: int = K):
    """What a teacher's `score` returns for these logits: top-k ids and log-probs, and the tail's log-mass."""
    logp_NV = torch.log_softmax(logits_NV.detach().float(), dim=-1)
    top_lp_NK, top_ids_NK = logp_NV.topk(k, dim=-1)
    return top_ids_NK, top_lp_NK, logp_NV.scatter(-1, top_ids_NK, float("-inf")).logsumexp(-1)


def completion_logits(model: Transformer, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The model's logits at the positions that predict each completion token, [len(completion), V]."""
    tokens = torch.tensor([prompt + completion])
    return model(tokens)[0, len(prompt) - 1 : -1]


def opd(logits_NV, tokens_N, teacher, temperature=1.0):
    n = tokens_N.shape[0]
    lp = token_logprobs(logits_NV, tokens_N, temperature).detach()
    return refine_loss(
        "opd", logits_NV, tokens_N, torch.ones(n, dtype=torch.bool),
        old_logp_N=lp, ref_logp_N=lp, advantages_N=torch.zeros(n),
        topk_ids_NK=teacher[0], topk_logprobs_NK=teacher[1], tail_logmass_N=teacher[2], temperature=temperature,
    )  # fmt: skip


def test_opd_is_zero_with_zero_gradient_when_the_student_is_the_teacher():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    prompt, completion = [3, 17, 5, 9], [11, 2, 40, 7, 7, 30]
    logits_NV = completion_logits(model, prompt, completion)
    loss = opd(logits_NV, torch.tensor(completion), teacher_scores(logits_NV))
    loss.total.backward()
    assert abs(loss.total.item()) < 1e-6
    grads = [p.grad.abs().max().item() for p in model.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-6


def dense_reverse_kl(student: Transformer, teacher: Transformer, prompts: list[list[int]]) -> float:
    """The exact KL(student || teacher) of the next-token distributions after each prompt, averaged."""
    with torch.no_grad():
        kls = []
        for p in prompts:
            logq = torch.log_softmax(student(torch.tensor([p]))[0, -1], -1)
            logp = torch.log_softmax(teacher(torch.tensor([p]))[0, -1], -1)
            kls.append((logq.exp() * (logq - logp)).sum().item())
    return sum(kls) / len(kls)


def test_opd_on_the_students_own_samples_moves_it_toward_the_teacher():
    torch.manual_seed(1)
    student, teacher = Transformer(CFG).train(), Transformer(CFG).eval()
    with torch.no_grad():  # a confident teacher, far from the student, so there is something to learn
        teacher.head.weight.mul_(8)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, V, (4,), generator=g).tolist() for _ in range(8)]
    before = dense_reverse_kl(student, teacher, prompts)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for step in range(25):
        completions = generate(student, prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=step))
        losses = []
        for p, c in zip(prompts, completions, strict=True):
            logits_NV = completion_logits(student, p, c.tokens)
            with torch.no_grad():
                # k = V: the whole distribution (with k < V only the k + 1 buckets are matched, the tail's inside
                # is not stored), so the exact KL below is what the loss minimises
                scored = teacher_scores(completion_logits(teacher, p, c.tokens), k=V)
            losses.append(opd(logits_NV, torch.tensor(c.tokens), scored).total)
        opt.zero_grad()
        torch.stack(losses).mean().backward()
        opt.step()
    after = dense_reverse_kl(student, teacher, prompts)
    assert after < 0.25 * before, (before, after)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    # group 0: mean 0.5, sample std sqrt(4 x 0.25 / 3) = 0.57735; group 1: all equal; group 2: mean 0.25, std 0.5
    s0 = 0.5 / math.sqrt(1 / 3)
    expected = torch.tensor([[s0, -s0, -s0, s0], [0.0, 0.0, 0.0, 0.0], [-0.5, -0.5, -0.5, 1.5]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))  # G = 1: no signal


@pytest.mark.parametrize(
    ("p_new", "p_old", "adv", "loss", "clipped"),
    [
        (0.8, 0.5, 1.0, -1.2, True),  # ratio 1.6, A > 0: capped at 1 + 0.2
        (0.8, 0.5, -1.0, 1.6, False),  # ratio 1.6, A < 0: the unclipped term is the smaller, kept
        (0.25, 0.5, 1.0, -0.5, False),  # ratio 0.5, A > 0: kept
        (0.25, 0.5, -1.0, 0.8, True),  # ratio 0.5, A < 0: floored at 1 - 0.2
        (0.55, 0.5, 2.0, -2.2, False),  # ratio 1.1 inside the band
    ],
)
def test_clipped_surrogate_by_hand(p_new, p_old, adv, loss, clipped):
    logp = torch.tensor([math.log(p_new)], requires_grad=True)
    out, was_clipped = clipped_surrogate(logp, torch.tensor([math.log(p_old)]), torch.tensor([adv]), clip_eps=0.2)
    torch.testing.assert_close(out, torch.tensor([loss]))
    assert bool(was_clipped[0]) is clipped
    out.sum().backward()
    # d/dlogp of -ratio x A is -ratio x A where unclipped; a clipped token gets no gradient
    expected_grad = 0.0 if clipped else -(p_new / p_old) * adv
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([expected_grad]))


def test_kl_to_reference_by_hand():
    # r = pi_ref / pi = 0.25 / 0.5: 0.5 - log 0.5 - 1
    got = kl_to_reference(torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)]))
    torch.testing.assert_close(got, torch.tensor([0.5 - math.log(0.5) - 1, 0.0]))


def test_objectives_combine_their_terms():
    torch.manual_seed(3)
    logits_NV = torch.randn(5, V, requires_grad=True)
    tokens_N = torch.tensor([1, 2, 3, 4, 5])
    mask_N = torch.tensor([True, True, True, True, False])
    teacher = teacher_scores(torch.randn(5, V))
    common = dict(
        old_logp_N=token_logprobs(logits_NV, tokens_N, 0.7).detach() + 0.1,
        ref_logp_N=token_logprobs(logits_NV, tokens_N, 0.7).detach() - 0.3,
        advantages_N=torch.tensor([1.0, -1.0, 0.5, 0.0, 9.0]),
        topk_ids_NK=teacher[0], topk_logprobs_NK=teacher[1], tail_logmass_N=teacher[2],
        temperature=0.7, kl_coef=0.05, opd_coef=0.5,
    )  # fmt: skip
    g = refine_loss("grpo", logits_NV, tokens_N, mask_N, **common)
    o = refine_loss("opd", logits_NV, tokens_N, mask_N, **common)
    b = refine_loss("both", logits_NV, tokens_N, mask_N, **common)
    torch.testing.assert_close(g.total, g.policy + 0.05 * g.kl_ref)
    torch.testing.assert_close(o.total, o.reverse_kl)
    torch.testing.assert_close(b.total, g.total + 0.5 * o.reverse_kl)
    # the masked fifth position (advantage 9) counts nowhere: changing it changes nothing
    common["advantages_N"] = torch.tensor([1.0, -1.0, 0.5, 0.0, -50.0])
    torch.testing.assert_close(refine_loss("grpo", logits_NV, tokens_N, mask_N, **common).total, g.total)
    assert o.reverse_kl.item() > 0 and g.kl_ref.item() > 0


def test_opd_is_the_reverse_kl_student_to_teacher():
    torch.manual_seed(4)
    logits_NV, teacher_NV = torch.randn(3, V), torch.randn(3, V)
    loss = opd(logits_NV, torch.tensor([0, 1, 2]), teacher_scores(teacher_NV, k=V))
    logq, logp = torch.log_softmax(logits_NV, -1), torch.log_softmax(teacher_NV, -1)
    by_hand = (logq.exp() * (logq - logp)).sum(-1).mean()  # KL(q || p), not KL(p || q)
    torch.testing.assert_close(loss.total, by_hand)
    assert not torch.allclose(by_hand, (logp.exp() * (logp - logq)).sum(-1).mean())
