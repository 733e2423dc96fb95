"""Fused output projection + cross-entropy, computed in row chunks.

With a 49,152-token vocabulary the logits of one 2k-token batch are 400 MB; materialising them, their
log-softmax and their gradient costs more than the projection's arithmetic on a CPU, mostly in page faults on
fresh buffers. Here each chunk's logits live in one reused buffer, are turned into softmax in place, and the
gradients for the hidden states and the projection weight are produced in the same pass (as Liger-Kernel's fused
linear cross-entropy does), so backward only rescales them.
"""

from __future__ import annotations

import torch

from pipeline.model.reused_tensors import temporary_buffers


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, ignore_index: int, chunk: int):
        N = h_ND.shape[0]
        valid_N = targets_N != ignore_index
        n_valid = int(valid_N.sum())
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        g_h_ND = torch.zeros_like(h_ND, dtype=torch.float32) if need_grad else None
        g_w_VD = torch.zeros_like(w_VD, dtype=torch.float32) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        if n_valid:
            buf_nV = temporary_buffers.get("ce_logits", (min(chunk, N), w_VD.shape[0]), h_ND, torch.float32)
            for s in range(0, N, chunk):  # n: the chunk's rows
                h_nD, targets_n, valid_n = h_ND[s : s + chunk].float(), targets_N[s : s + chunk], valid_N[s : s + chunk]
                n = h_nD.shape[0]
                rows_n = torch.arange(n, device=h_ND.device)
                logits_nV = torch.mm(h_nD, w_VD.float().t(), out=buf_nV[:n])
                probs_nV = torch.ops.aten._softmax.out(logits_nV, -1, False, out=logits_nV)  # in place
                p_target_n = probs_nV[rows_n, targets_n.clamp_min(0)]
                total += -(p_target_n.clamp_min(torch.finfo(torch.float32).tiny).log() * valid_n).sum()
                # need_grad: d(mean CE)/d(logits) = (softmax - onehot) / n_valid, masked rows 0
                if g_h_ND is not None and g_w_VD is not None:
                    probs_nV[rows_n, targets_n.clamp_min(0)] -= 1
                    probs_nV.mul_((valid_n.float() / n_valid)[:, None])
                    torch.mm(probs_nV, w_VD.float(), out=g_h_ND[s : s + n])
                    g_w_VD.addmm_(probs_nV.t(), h_nD)
        if g_h_ND is not None and g_w_VD is not None:
            g_h_ND, g_w_VD = g_h_ND.to(h_ND.dtype), g_w_VD.to(w_VD.dtype)
        ctx.save_for_backward(g_h_ND, g_w_VD)
        return total / max(n_valid, 1)

    @staticmethod
    def backward(ctx, g_loss):
        g_h_ND, g_w_VD = ctx.saved_tensors
        return g_h_ND * g_loss, g_w_VD * g_loss, None, None, None


def linear_cross_entropy(
    h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor, ignore_index: int = -100, chunk: int = 512
) -> torch.Tensor:
    """mean over non-ignored rows of cross_entropy(h @ w^T, targets), without materialising all logits.

    Args:
        h_ND: final hidden states, one row per position.
        w_VD: the output projection's weight.
        targets_N: target token ids; `ignore_index` rows count for nothing (all ignored: the loss is 0).
        chunk: rows per chunk; the working buffer is chunk x V floats.
    """
    return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, ignore_index, chunk)
