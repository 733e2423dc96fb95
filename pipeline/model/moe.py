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

from pipeline.config import ModelConfig


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

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = cfg.n_activated_experts, cfg.n_group, cfg.topk_group
        self.route_scale = cfg.route_scale
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
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20) * self.route_scale
        return weights_TK, ids_TK, scores_TE


# ---------------------------------------------------------------------------------------------------- experts


class _GroupedSwiGLU(torch.autograd.Function):
    """Every expert's SwiGLU over its contiguous segment of expert-sorted rows, with a hand-written backward.

    One autograd node for all experts instead of a dozen per expert: the elementwise work runs once over all
    rows, and only the GEMMs are per segment, written into preallocated buffers.
    """

    @staticmethod
    def forward(ctx, x_PD: torch.Tensor, w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor, counts: list[int]):
        P, F2 = x_PD.shape[0], w13_E2FD.shape[1]
        h_P2F = x_PD.new_empty(P, F2)
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x_PD[start:start + n], w13_E2FD[e].t(), out=h_P2F[start:start + n])
            start += n
        gate_PF, up_PF = h_P2F.chunk(2, dim=-1)
        act_PF = F.silu(gate_PF) * up_PF
        y_PD = x_PD.new_empty(P, w2_EDF.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(act_PF[start:start + n], w2_EDF[e].t(), out=y_PD[start:start + n])
            start += n
        ctx.save_for_backward(x_PD, h_P2F, w13_E2FD, w2_EDF)
        ctx.counts = counts
        return y_PD

    @staticmethod
    def backward(ctx, gy_PD: torch.Tensor):
        x_PD, h_P2F, w13_E2FD, w2_EDF = ctx.saved_tensors
        gate_PF, up_PF = h_P2F.chunk(2, dim=-1)
        sig_PF = torch.sigmoid(gate_PF)
        silu_PF = gate_PF * sig_PF
        act_PF = silu_PF * up_PF
        gy_PD = gy_PD.contiguous()
        g_act_PF = torch.empty_like(act_PF)
        g_w2_EDF = torch.zeros_like(w2_EDF)
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                s = slice(start, start + n)
                torch.mm(gy_PD[s], w2_EDF[e], out=g_act_PF[s])
                torch.mm(gy_PD[s].t(), act_PF[s], out=g_w2_EDF[e])
            start += n
        g_h_P2F = torch.cat([g_act_PF * up_PF * sig_PF * (1 + gate_PF * (1 - sig_PF)), g_act_PF * silu_PF], dim=-1)
        g_x_PD = torch.empty_like(x_PD)
        g_w13_E2FD = torch.zeros_like(w13_E2FD)
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                s = slice(start, start + n)
                torch.mm(g_h_P2F[s], w13_E2FD[e], out=g_x_PD[s])
                torch.mm(g_h_P2F[s].t(), x_PD[s], out=g_w13_E2FD[e])
            start += n
        return g_x_PD, g_w13_E2FD, g_w2_EDF, None


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
        """Dropless: sort token-expert pairs by expert, one GEMM pair per expert segment, weighted combine."""
        T, K = ids_TK.shape
        order_P = ids_TK.flatten().argsort(stable=True)  # pair p = t*K + k, grouped by expert
        counts = torch.bincount(ids_TK.flatten(), minlength=self.w13.shape[0]).tolist()  # the one host sync
        x_PD = x_TD.index_select(0, order_P // K)
        y_PD = _GroupedSwiGLU.apply(x_PD, self.w13, self.w2, counts)
        # back to (token, k) order, then each token's weighted sum over its K experts as one batched matmul
        y_TKD = torch.empty_like(y_PD).index_copy(0, order_P, y_PD).view(T, K, -1)
        return torch.bmm(weights_TK.to(y_TKD.dtype)[:, None, :], y_TKD).squeeze(1)


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
            1, ids_BSK.reshape(B, -1), torch.ones(B, ids_BSK[0].numel(), device=ids_BSK.device))
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
    for gate, error_E in zip(gates, error_LE):
        gate.bias += speed * error_E.sign()
        gate.counts.zero_()
    return counts_LE
