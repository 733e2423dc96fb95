"""The student's distillation objective on packed windows: it trains, and rows without soft targets are CE."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.distill.targets import loss_mask
from pipeline.model import Transformer
from pipeline.train.objective import objective, to_tensors
from pipeline.train.packing import pack

V = 64
CFG = ModelConfig(
    vocab_size=V,
    dim=32,
    n_layers=2,
    n_heads=2,
    inter_dim=64,
    moe_inter_dim=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=4,
    n_activated_experts=2,
    max_seq_len=64,
)


def teacher_row(rng, soft=True):
    """A 'task' whose answer continues +1 mod V; the teacher is 90% sure of it, the rest in its top-3 and tail."""
    prompt = list(rng.integers(0, V, 5))
    answer = [(prompt[-1] + i + 1) % V for i in range(6)]
    tokens = prompt + answer
    mask = loss_mask(len(tokens), len(prompt))
    nxt = [tokens[i + 1] for i, m in enumerate(mask) if m]
    return {
        "token_ids": tokens,
        "loss_mask": mask,
        "topk_ids": [[t, (t + 1) % V, (t + 2) % V] for t in nxt] if soft else [],
        "topk_logprobs": [[np.log(0.9), np.log(0.04), np.log(0.03)]] * len(nxt) if soft else [],
        "tail_logmass": [float(np.log(0.03))] * len(nxt) if soft else [],
    }


def test_the_objective_trains_the_student_toward_the_teacher():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = Transformer(CFG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = TrainConfig(kd_alpha=0.7)
    batch = to_tensors(pack([teacher_row(rng) for _ in range(16)], seq_len=32, k=3))
    first = None
    for _ in range(40):
        loss = objective(model, batch, cfg)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        first = first or (loss.kd.item(), loss.ce.item())
    assert loss.tokens == 16 * 6
    assert loss.kd.item() < 0.5 * first[0] and loss.ce.item() < 0.5 * first[1]


def test_rows_without_soft_targets_are_plain_cross_entropy():
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    model = Transformer(CFG).eval()  # eval: no balance term, so total is exactly the mix
    rows = [teacher_row(rng, soft=False) for _ in range(4)]
    batch = to_tensors(pack(rows, seq_len=16, k=3))
    loss = objective(model, batch, TrainConfig(kd_alpha=0.9))
    assert loss.kd.item() == 0.0 and torch.equal(loss.total, loss.ce)
    with torch.no_grad():
        logits = model(batch["tokens_BT"])  # the full forward: the objective's head-at-mask must agree
    m = batch["mask_BT"]
    ref = torch.nn.functional.cross_entropy(logits[m].float(), batch["targets_BT"][m])
    torch.testing.assert_close(loss.ce, ref, rtol=1e-4, atol=1e-4)
