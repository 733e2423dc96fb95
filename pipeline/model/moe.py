"""DeepSeekMoE: shared experts plus fine-grained routed experts, auxiliary-loss-free load balancing.

Leaves first: the SwiGLU MLP, the router (`Gate`), the routed experts with two dispatch implementations, the MoE
layer, then the bias update that runs after each optimizer step (outside `forward`). Shape suffixes: T tokens,
D model dim, F expert width, E routed experts, K experts per token, P = T·K token-expert pairs, B batch, S sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.scratch import scratch as _scratch


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(x W1) * (x W3)), with W1 and W3 fused into one `w13` matmul."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * inter_dim, bias=False)  # rows [0, F) gate (W1), [F, 2F) up (W3)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Gate(nn.Module):
    """Top-k router on sigmoid affinities, with DeepSeek-V3's bias-corrected selection.

    The per-expert `bias` shifts which experts are *selected* (it is added to the affinities before top-k) but
    never the *weights* given to them: that is how the auxiliary-loss-free scheme balances load without a gradient
    that fights the language-modelling loss. `counts` accumulates how many tokens each expert received in training
    since the last `update_router_biases`.
    """

    bias: torch.Tensor  # buffers, declared for type checkers
    counts: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = cfg.n_activated_experts, cfg.n_group, cfg.topk_group
        self.route_scale, self.unit_weights = cfg.route_scale, cfg.route_weight == "unit"
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))
        self.register_buffer("counts", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (weights_TK, ids_TK, scores_TE): normalised scaled weights, chosen experts, all affinities."""
        scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()
        choice_TE = scores_TE.detach() + self.bias
        if self.n_groups > 1:  # group-limited routing: only experts in the best `topk_group` groups compete
            T, E = choice_TE.shape
            choice_TGe = choice_TE.view(T, self.n_groups, E // self.n_groups)
            group_scores_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
            top_groups_TG = group_scores_TG.topk(self.topk_groups, dim=-1).indices
            keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
            choice_TE = choice_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E)
        ids_TK = choice_TE.topk(self.topk, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.unit_weights:  # 1 in value, the affinity's gradient in backward
            return 1.0 + weights_TK - weights_TK.detach(), ids_TK, scores_TE
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20) * self.route_scale
        return weights_TK, ids_TK, scores_TE


# ---------------------------------------------------------------------------------------------------- experts


def _segment_mm(
    a_PX: torch.Tensor,
    w_EYX: torch.Tensor,
    counts: list[int],
    out_PY: torch.Tensor,
    transpose: bool = True,
    accumulate: bool = False,
) -> torch.Tensor:
    """out[seg_e] (+)= a[seg_e] @ w[e]^T (or @ w[e]) for each expert's contiguous segment of rows."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            a, w, o = a_PX[start : start + n], (w_EYX[e].t() if transpose else w_EYX[e]), out_PY[start : start + n]
            torch.addmm(o, a, w, out=o) if accumulate else torch.mm(a, w, out=o)
        start += n
    return out_PY


def _segment_wgrad(g_PY: torch.Tensor, a_PX: torch.Tensor, counts: list[int], out_EYX: torch.Tensor) -> torch.Tensor:
    """out[e] = g[seg_e]^T @ a[seg_e]: each expert's weight gradient (zero for an expert with no tokens)."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(g_PY[start : start + n].t(), a_PX[start : start + n], out=out_EYX[e])
        else:
            out_EYX[e].zero_()
        start += n
    return out_EYX


class _RoutedExperts(torch.autograd.Function):
    """Gather -> per-expert SwiGLU -> weighted scatter-add, as one autograd node with a hand-written backward.

    Rows are token-expert pairs sorted by expert (`tok_P` says which token each row came from). Why by hand:
    one node for all experts instead of a dozen per expert; elementwise work runs once over all rows on
    contiguous buffers (gate and up halves get GEMMs of their own for that); only the GEMMs are per segment, into
    preallocated buffers; the routing weight scales the activation (F wide) rather than the output (D wide).
    """

    @staticmethod
    def forward(ctx, x_TD, w_P, tok_P, w13_E2FD, w2_EDF, counts: list[int]):
        P, F_ = tok_P.shape[0], w2_EDF.shape[2]
        w1_EFD, w3_EFD = w13_E2FD[:, :F_], w13_E2FD[:, F_:]
        x_PD = x_TD.index_select(0, tok_P)
        gate_PF = _segment_mm(x_PD, w1_EFD, counts, x_PD.new_empty(P, F_))
        up_PF = _segment_mm(x_PD, w3_EFD, counts, x_PD.new_empty(P, F_))
        silu_PF = F.silu(gate_PF)
        act_w_PF = silu_PF * up_PF * w_P[:, None]
        y_PD = _segment_mm(act_w_PF, w2_EDF, counts, _scratch.get("y", (P, x_TD.shape[1]), x_PD))
        ctx.save_for_backward(x_PD, gate_PF, up_PF, silu_PF, act_w_PF, w_P, tok_P, w13_E2FD, w2_EDF)
        ctx.counts, ctx.T = counts, x_TD.shape[0]
        return torch.zeros_like(x_TD).index_add_(0, tok_P, y_PD)

    @staticmethod
    def backward(ctx, g_out_TD):
        x_PD, gate_PF, up_PF, silu_PF, act_w_PF, w_P, tok_P, w13_E2FD, w2_EDF = ctx.saved_tensors
        counts, F_ = ctx.counts, silu_PF.shape[1]
        P = tok_P.shape[0]
        g_y_PD = torch.index_select(g_out_TD, 0, tok_P, out=_scratch.get("g_y", (P, g_out_TD.shape[1]), x_PD))
        g_act_w_PF = _segment_mm(g_y_PD, w2_EDF, counts, _scratch.get("g_act", (P, F_), x_PD), transpose=False)
        g_w2_EDF = _segment_wgrad(g_y_PD, act_w_PF, counts, torch.empty_like(w2_EDF))
        g_w_P = torch.linalg.vecdot(g_act_w_PF, silu_PF * up_PF)  # recomputed: cheaper than keeping it
        g_act_PF = g_act_w_PF.mul_(w_P[:, None])
        g_gate_PF = torch.mul(g_act_PF, up_PF, out=_scratch.get("g_gate", (P, F_), x_PD))
        torch.ops.aten.silu_backward(g_gate_PF, gate_PF, grad_input=g_gate_PF)
        g_up_PF = g_act_PF.mul_(silu_PF)
        w1_EFD, w3_EFD = w13_E2FD[:, :F_], w13_E2FD[:, F_:]
        g_x_PD = _segment_mm(g_gate_PF, w1_EFD, counts, _scratch.get("g_x", tuple(x_PD.shape), x_PD), transpose=False)
        _segment_mm(g_up_PF, w3_EFD, counts, g_x_PD, transpose=False, accumulate=True)
        g_w13_E2FD = torch.empty_like(w13_E2FD)
        _segment_wgrad(g_gate_PF, x_PD, counts, g_w13_E2FD[:, :F_])
        _segment_wgrad(g_up_PF, x_PD, counts, g_w13_E2FD[:, F_:])
        g_x_TD = g_out_TD.new_zeros(ctx.T, x_PD.shape[1]).index_add_(0, tok_P, g_x_PD)
        return g_x_TD, g_w_P, None, g_w13_E2FD, g_w2_EDF, None


class Experts(nn.Module):
    """E routed SwiGLU experts as stacked weights: `w13` (E, 2F, D) gate|up, `w2` (E, D, F) down."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, impl: str):
        super().__init__()
        self.impl = impl
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        if self.impl == "loop":
            return self.forward_loop(x_TD, weights_TK, ids_TK)
        return self.forward_batched(x_TD, weights_TK, ids_TK)

    def forward_loop(self, x_TD, weights_TK, ids_TK) -> torch.Tensor:
        """Reference: for each expert, mask its tokens, run it, add the weighted result. The test oracle."""
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.w13.shape[0]):
            tok_idx, k_idx = torch.where(ids_TK == e)
            if tok_idx.numel() == 0:
                continue
            gate, up = F.linear(x_TD[tok_idx], self.w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e])
            out_TD = out_TD.index_add(0, tok_idx, y * weights_TK[tok_idx, k_idx, None].to(y.dtype))
        return out_TD

    def forward_batched(self, x_TD, weights_TK, ids_TK) -> torch.Tensor:
        """Dropless: sort token-expert pairs by expert, one GEMM pair per expert segment, weighted scatter-add."""
        K = ids_TK.shape[1]
        ids_P = ids_TK.flatten()  # pair p = t*K + k
        order_P = ids_P.argsort(stable=True)
        counts = torch.bincount(ids_P, minlength=self.w13.shape[0]).tolist()  # the one host sync
        w_P = weights_TK.flatten().index_select(0, order_P).to(x_TD.dtype)
        return _RoutedExperts.apply(x_TD, w_P, order_P // K, self.w13, self.w2, counts)


class MoE(nn.Module):
    """DeepSeekMoE layer: always-on shared experts plus top-k of `n_routed_experts` routed experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.topk, self.alpha = cfg.n_routed_experts, cfg.n_activated_experts, cfg.seq_aux_alpha
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.moe_impl)
        self.shared = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        self.balance_loss = torch.zeros(())

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        weights_TK, ids_TK, scores_TE = self.gate(x_TD)
        out_TD = self.experts(x_TD, weights_TK, ids_TK)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        if self.training:
            with torch.no_grad():
                self.gate.counts += torch.bincount(ids_TK.flatten(), minlength=self.n_experts).to(self.gate.counts)
            self.balance_loss = self._sequence_balance_loss(scores_TE.view(B, S, -1), ids_TK.view(B, S, -1))
        return out_TD.view(B, S, D)

    def _sequence_balance_loss(self, scores_BSE: torch.Tensor, ids_BSK: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's complementary sequence-wise balance loss: alpha * sum_i f_i * P_i per sequence.

        f_i: expert i's share of the sequence's top-k slots, times E/K (1 when perfectly even);
        P_i: expert i's mean normalised affinity over the sequence.
        """
        if self.alpha == 0:
            return scores_BSE.new_zeros(())
        B, S, E = scores_BSE.shape
        hits_BE = torch.zeros(B, E, device=ids_BSK.device).scatter_add_(
            1, ids_BSK.reshape(B, -1), torch.ones(B, ids_BSK[0].numel(), device=ids_BSK.device)
        )
        f_BE = hits_BE * E / (self.topk * S)
        p_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)).mean(dim=1)
        return self.alpha * (f_BE * p_BE).sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------------------- balancing


def load_imbalance(counts_E: torch.Tensor) -> float:
    """Coefficient of variation of tokens per expert (0 = perfectly balanced)."""
    counts_E = counts_E.float()
    return float(counts_E.std(unbiased=False) / counts_E.mean().clamp_min(1e-9))


@torch.no_grad()
def update_router_biases(
    model: nn.Module, speed: float, all_reduce: Callable[[torch.Tensor], object] | None = None
) -> torch.Tensor:
    """The auxiliary-loss-free bias update; call after each optimizer step, never inside `forward`.

    Each expert's bias moves by `speed` toward balance: down if it took more than the mean load since the last
    update, up if less. With data parallelism pass `all_reduce` (e.g. `torch.distributed.all_reduce`, in place,
    sum): the counts of every replica are summed first, so all replicas apply the same update and keep identical
    biases.

    Returns:
        The (n_moe_layers, E) token counts that drove the update (after the all-reduce), for logging.
    """
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    if not gates:
        return torch.zeros(0, 0)
    counts_LE = torch.stack([g.counts for g in gates])
    if all_reduce is not None:
        all_reduce(counts_LE)
    error_LE = counts_LE.mean(dim=-1, keepdim=True) - counts_LE  # > 0: under-loaded
    for gate, error_E in zip(gates, error_LE, strict=True):
        gate.bias += speed * error_E.sign()
        gate.counts.zero_()
    return counts_LE
