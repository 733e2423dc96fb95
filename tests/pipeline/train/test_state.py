"""A replica's train state: the LR schedule, and a resume from a checkpoint that continues exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.model import Transformer
from pipeline.train.state import TrainState, lr_factor
from pipeline.train.stream import WindowStream
from tests.pipeline.train.test_objective import CFG, teacher_row


def test_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55) and lr_factor(100, cfg) == pytest.approx(0.1)
    assert all(lr_factor(s, cfg) >= lr_factor(s + 1, cfg) for s in range(10, 100))


def _state(cfg):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    rows = [teacher_row(rng) for _ in range(12)]
    return TrainState(Transformer(CFG), cfg, WindowStream(lambda epoch: rows, seq_len=16, k=3, buffer_windows=4))


def test_resuming_from_a_checkpoint_continues_exactly():
    cfg = TrainConfig(max_steps=8, warmup_steps=2, batch_size=3, lr=3e-3)
    straight = _state(cfg)
    losses = [m["loss"] for m in straight.run(8)]
    assert losses[-1] < losses[0]

    first = _state(cfg)
    list(first.run(5))  # 15 windows drawn from 9, through a buffer of 4: crosses an epoch boundary
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _state(cfg)  # a fresh process: new model, optimizer, data order
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.step == 5 and resumed.epoch == 1
    tail = [m["loss"] for m in resumed.run(3)]
    assert tail == pytest.approx(losses[5:], rel=1e-6)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # router biases included


def test_micro_batches_give_the_whole_batchs_step():
    """Gradient accumulation: a batch run in slices (even or not) gets the loss and gradient of the whole batch at
    once, while each forward holds only its slice."""
    model_cfg = CFG.model_copy(update={"seq_aux_alpha": 0.0})  # the balance term is a per-sequence mean

    def one_step(micro):
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        rows = [teacher_row(rng) for _ in range(12)]
        cfg = TrainConfig(max_steps=4, warmup_steps=1, batch_size=6, micro_batch_size=micro, lr=3e-3)
        state = TrainState(Transformer(model_cfg), cfg, WindowStream(lambda e: rows, seq_len=16, k=3, buffer_windows=8))
        forwards: list[int] = []  # sequences per forward, seen at the embedding
        state.model.embed.register_forward_hook(lambda m, args, out: forwards.append(out.shape[0]))
        metrics = state.train_step()
        return metrics, {n: p.grad.clone() for n, p in state.model.named_parameters() if p.grad is not None}, forwards

    whole, grads, forwards = one_step(None)
    assert forwards == [6]
    for micro, slices in ((2, [2, 2, 2]), (4, [4, 2])):
        sliced, sliced_grads, forwards = one_step(micro)
        assert forwards == slices
        for key in ("loss", "kd", "ce", "tokens"):
            assert sliced[key] == pytest.approx(whole[key], rel=1e-5), (micro, key)
        assert sliced_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(sliced_grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{name}, micro {micro}")
