from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.model.config import model_preset
from pipeline.model.loss import linear_cross_entropy
from pipeline.model.transformer import Transformer


def _reference(h, w, t, ignore_index=-100):
    return F.cross_entropy(h @ w.t(), t, ignore_index=ignore_index)


def test_fused_loss_and_grads_equal_materialised_cross_entropy():
    torch.manual_seed(0)
    h0, w0 = torch.randn(300, 32), torch.randn(1000, 32) * 0.3
    t = torch.randint(0, 1000, (300,))
    t[::7] = -100  # ignored positions (prompt tokens, padding)
    h1, w1 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    fused = linear_cross_entropy(h1, w1, t, chunk=64)  # several chunks, the last one partial
    ref = _reference(h2, w2, t)
    torch.testing.assert_close(fused, ref)
    (2.5 * fused).backward()
    (2.5 * ref).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    assert h1.grad[::7].abs().sum() == 0


def test_all_ignored_is_zero_not_nan():
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0


def test_model_loss_equals_logits_cross_entropy_with_mtp():
    torch.manual_seed(0)
    model = Transformer(model_preset("toy", vocab_size=90, mtp_depth=1)).train()
    batch = torch.randint(0, 90, (2, 21))
    x, y = batch[:, :-1], batch[:, 1:]
    losses = model.loss(x, y)
    out = model(x, return_aux=True)
    ce = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    mtp = F.cross_entropy(out.mtp_logits.flatten(0, 1), y[:, 1:].flatten())
    torch.testing.assert_close(losses.ce, ce)
    torch.testing.assert_close(losses.mtp, mtp)
    torch.testing.assert_close(losses.total, ce + out.balance_loss + model.cfg.mtp_lambda * mtp)
