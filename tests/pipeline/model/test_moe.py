"""DeepSeekMoE: batched dispatch vs the loop oracle, parity with transformers' DeepseekV3, load balancing."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.model.config import model_preset
from pipeline.model.hf_compat import copy_moe_to_hf, hf_moe
from pipeline.model.moe import MoE, load_imbalance, update_router_biases


def _moe(impl="batched", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = model_preset("toy", moe_impl=impl, **kw)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return moe


@pytest.mark.parametrize("groups", [dict(), dict(n_routed_experts=16, n_activated_experts=4, n_group=4, topk_group=2)])
def test_batched_dispatch_equals_loop_reference(groups):
    batched, loop = _moe("batched", **groups), _moe("loop", **groups)
    loop.load_state_dict(batched.state_dict())
    x1 = torch.randn(3, 37, batched.gate.weight.shape[1], requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = batched(x1), loop(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for (name, p1), p2 in zip(batched.named_parameters(), loop.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-4, msg=name)  # grads reach ~40


@pytest.mark.parametrize(
    "groups",
    [
        dict(n_routed_experts=16, n_activated_experts=4),
        dict(n_routed_experts=16, n_activated_experts=4, n_group=4, topk_group=2),
    ],
)
def test_router_and_layer_match_transformers_deepseek_v3(groups):
    ours = _moe(route_scale=2.5, **groups)
    with torch.no_grad():
        ours.gate.bias.copy_(torch.randn_like(ours.gate.bias) * 0.05)  # a trained-looking correction bias
    hf = hf_moe(model_preset("toy", route_scale=2.5, **groups))
    copy_moe_to_hf(ours, hf)
    x = torch.randn(2, 50, ours.gate.weight.shape[1])
    weights, ids, _ = ours.gate(x.view(-1, x.shape[-1]))
    _, hf_weights, hf_ids = hf.gate(x)
    # transformers returns top-k unsorted: compare as sets, with the weights that go with each expert
    order, hf_order = ids.argsort(-1), hf_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order))
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)


def _skewed(seed=0):
    """A router that sends most tokens to experts 0 and 1 (a shared direction in every input)."""
    moe = _moe(seed=seed, n_routed_experts=8, n_activated_experts=2)
    moe.train()
    with torch.no_grad():
        moe.gate.weight[:2] += 0.1
    return moe


def _route(moe, steps, speed, gen, all_reduce=None):
    cvs = []
    for _ in range(steps):
        x = torch.randn(4, 64, moe.gate.weight.shape[1], generator=gen) + 0.5
        with torch.no_grad():
            moe(x)
        counts = update_router_biases(moe, speed, all_reduce)
        cvs.append(load_imbalance(counts[0]))
    return cvs


def test_bias_update_lowers_load_imbalance():
    moe = _skewed()
    gen = torch.Generator().manual_seed(1)
    cvs = _route(moe, 300, 2e-3, gen)
    before, after = sum(cvs[:10]) / 10, sum(cvs[-20:]) / 20
    assert before > 1.0, f"router was not skewed (CV {before:.2f})"
    assert after < 0.35 * before, f"imbalance CV {before:.2f} -> {after:.2f}"
    assert moe.gate.bias[:2].max() < min(0.0, float(moe.gate.bias[2:].min()))  # the skewed experts pushed down most


def test_bias_does_not_change_routing_weights_only_selection():
    moe = _moe()
    x = torch.randn(64, moe.gate.weight.shape[1])
    w0, ids0, s0 = moe.gate(x)
    with torch.no_grad():
        moe.gate.bias.copy_(torch.randn_like(moe.gate.bias))
    w1, ids1, s1 = moe.gate(x)
    torch.testing.assert_close(s0, s1)  # affinities do not see the bias
    same = (ids0.sort(-1).values == ids1.sort(-1).values).all(-1)
    # both kinds of token exist, so neither check below can pass vacuously
    assert same.any() and (~same).any(), f"{int(same.sum())} of {len(same)} tokens kept their experts"
    torch.testing.assert_close(w0[same].sort(-1).values, w1[same].sort(-1).values)
    # tokens the bias moved get the plain normalised affinities of their new experts, never a biased weight
    chosen = s1.gather(1, ids1)
    torch.testing.assert_close(w1, chosen / chosen.sum(-1, keepdim=True) * moe.gate.route_scale)


def _dp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        moe = _skewed(seed=0)  # identical init on every replica
        gen = torch.Generator().manual_seed(100 + rank)  # different data per replica
        _route(moe, 50, 1e-3, gen, all_reduce=dist.all_reduce)
        torch.save(moe.gate.bias, os.path.join(out_dir, f"bias{rank}.pt"))
        solo = _skewed(seed=0)
        _route(solo, 50, 1e-3, torch.Generator().manual_seed(100 + rank))  # without the all-reduce
        torch.save(solo.gate.bias, os.path.join(out_dir, f"solo{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_replicas_keep_identical_biases(tmp_path):
    mp.spawn(_dp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    b0, b1 = torch.load(tmp_path / "bias0.pt"), torch.load(tmp_path / "bias1.pt")
    assert torch.equal(b0, b1) and b0.abs().sum() > 0
    assert not torch.equal(torch.load(tmp_path / "solo0.pt"), torch.load(tmp_path / "solo1.pt"))


def test_sequence_balance_loss_has_gradient_and_is_alpha_at_balance():
    moe = _moe(seq_aux_alpha=0.01)
    moe.train()
    x = torch.randn(2, 32, moe.gate.weight.shape[1])
    moe(x)
    moe.balance_loss.backward()
    assert moe.balance_loss > 0 and moe.gate.weight.grad.abs().sum() > 0
    # perfectly even hits and flat affinities give f_i = 1, P_i = 1/E, so the loss is exactly alpha
    E, K, S = 8, 2, 8
    ids = torch.arange(E).repeat(S * K // E).view(1, S, K)
    loss = moe._sequence_balance_loss(torch.full((1, S, E), 0.3), ids)
    torch.testing.assert_close(loss, torch.tensor(0.01))


@pytest.mark.parametrize("n_tokens", [1, 2, 3, 7, 16, 33, 64])
@pytest.mark.parametrize("groups", [dict(), dict(n_routed_experts=16, n_activated_experts=4, n_group=4, topk_group=2)])
def test_the_fused_inference_path_equals_the_loop_oracle_for_small_token_counts(n_tokens, groups):
    fused, loop = _moe("batched", **groups).eval(), _moe("loop", **groups).eval()
    loop.load_state_dict(fused.state_dict())
    x = torch.randn(1, n_tokens, fused.gate.weight.shape[1])
    with torch.no_grad():
        y_fused, y_loop = fused(x), loop(x)
    assert fused.experts.w2_fused.built, "an inference call of <= FUSED_MAX_TOKENS tokens took another path"
    torch.testing.assert_close(y_fused, y_loop, rtol=1e-5, atol=1e-5)


def test_the_fused_path_sees_weights_changed_after_its_first_call():
    """The fused path keeps w2 in its own layout; an in-place update (an optimizer step, a load) must reach it."""
    fused, loop = _moe("batched").eval(), _moe("loop").eval()
    x = torch.randn(1, 4, fused.gate.weight.shape[1])
    with torch.no_grad():
        fused(x)
        fused.experts.w2.mul_(-2.0)
        loop.load_state_dict(fused.state_dict())
        torch.testing.assert_close(fused(x), loop(x), rtol=1e-5, atol=1e-5)
