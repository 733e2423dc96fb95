"""DeepSeekMoE: shared experts plus fine-grained routed experts, auxiliary-loss-free load balancing.

Leaves first: the SwiGLU MLP, the router (`Gate`), the routed experts with three dispatch implementations (the
per-expert loop kept as the oracle, the sorted-segment one for training and large batches, the fused one for
decoding), the MoE layer, then the bias update that runs after each optimizer step (outside `forward`). Shape
suffixes: the legend in `pipeline/model/__init__.py` (here chiefly N tokens, E experts, K choices per token, A = N·K
assignments).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.reused_tensors import DerivedLayout
from pipeline.model.reused_tensors import temporary_buffers as _buffers


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

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (weights_NK, ids_NK, scores_NE): normalised scaled weights, chosen experts, all affinities."""
        scores_NE = F.linear(x_ND.float(), self.weight.float()).sigmoid()
        choice_NE = scores_NE.detach() + self.bias
        if self.n_groups > 1:  # group-limited routing: only experts in the best `topk_group` groups compete
            N, E = choice_NE.shape
            choice_NMe = choice_NE.view(N, self.n_groups, E // self.n_groups)
            group_scores_NM = choice_NMe.topk(2, dim=-1).values.sum(dim=-1)
            top_groups_Nm = group_scores_NM.topk(self.topk_groups, dim=-1).indices
            keep_NM = torch.zeros_like(group_scores_NM, dtype=torch.bool).scatter_(1, top_groups_Nm, True)
            choice_NE = choice_NMe.masked_fill(~keep_NM[..., None], float("-inf")).view(N, E)
        ids_NK = choice_NE.topk(self.topk, dim=-1).indices
        weights_NK = scores_NE.gather(1, ids_NK)
        if self.unit_weights:  # 1 in value, the affinity's gradient in backward
            return 1.0 + weights_NK - weights_NK.detach(), ids_NK, scores_NE
        weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20) * self.route_scale
        return weights_NK, ids_NK, scores_NE


# ---------------------------------------------------------------------------------------------------- experts


def _segment_mm(
    a_AX: torch.Tensor,
    w_EYX: torch.Tensor,
    counts: list[int],
    out_AY: torch.Tensor,
    transpose: bool = True,
    accumulate: bool = False,
) -> torch.Tensor:
    """out[seg_e] (+)= a[seg_e] @ w[e]^T (or @ w[e]) for each expert's contiguous segment of rows."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            a, w, o = a_AX[start : start + n], (w_EYX[e].t() if transpose else w_EYX[e]), out_AY[start : start + n]
            torch.addmm(o, a, w, out=o) if accumulate else torch.mm(a, w, out=o)
        start += n
    return out_AY


def _segment_wgrad(g_AY: torch.Tensor, a_AX: torch.Tensor, counts: list[int], out_EYX: torch.Tensor) -> torch.Tensor:
    """out[e] = g[seg_e]^T @ a[seg_e]: each expert's weight gradient (zero for an expert with no tokens)."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(g_AY[start : start + n].t(), a_AX[start : start + n], out=out_EYX[e])
        else:
            out_EYX[e].zero_()
        start += n
    return out_EYX


class _RoutedExperts(torch.autograd.Function):
    """Gather -> per-expert SwiGLU -> weighted scatter-add, as one autograd node with a hand-written backward.

    Rows are token-expert assignments sorted by expert (`tok_A` says which token each row came from). Why by hand:
    one node for all experts instead of a dozen per expert; elementwise work runs once over all rows on
    contiguous buffers (gate and up halves get GEMMs of their own for that); only the GEMMs are per segment, into
    preallocated buffers; the routing weight scales the activation (F wide) rather than the output (D wide).
    """

    @staticmethod
    def forward(ctx, x_ND, w_A, tok_A, w13_E2FD, w2_EDF, counts: list[int]):
        A, F_ = tok_A.shape[0], w2_EDF.shape[2]
        w1_EFD, w3_EFD = w13_E2FD[:, :F_], w13_E2FD[:, F_:]
        x_AD = x_ND.index_select(0, tok_A)
        gate_AF = _segment_mm(x_AD, w1_EFD, counts, x_AD.new_empty(A, F_))
        up_AF = _segment_mm(x_AD, w3_EFD, counts, x_AD.new_empty(A, F_))
        silu_AF = F.silu(gate_AF)
        act_w_AF = silu_AF * up_AF * w_A[:, None]
        y_AD = _segment_mm(act_w_AF, w2_EDF, counts, _buffers.get("y", (A, x_ND.shape[1]), x_AD))
        ctx.save_for_backward(x_AD, gate_AF, up_AF, silu_AF, act_w_AF, w_A, tok_A, w13_E2FD, w2_EDF)
        ctx.counts, ctx.N = counts, x_ND.shape[0]
        return torch.zeros_like(x_ND).index_add_(0, tok_A, y_AD)

    @staticmethod
    def backward(ctx, g_out_ND):
        x_AD, gate_AF, up_AF, silu_AF, act_w_AF, w_A, tok_A, w13_E2FD, w2_EDF = ctx.saved_tensors
        counts, F_ = ctx.counts, silu_AF.shape[1]
        A = tok_A.shape[0]
        g_y_AD = torch.index_select(g_out_ND, 0, tok_A, out=_buffers.get("g_y", (A, g_out_ND.shape[1]), x_AD))
        g_act_w_AF = _segment_mm(g_y_AD, w2_EDF, counts, _buffers.get("g_act", (A, F_), x_AD), transpose=False)
        g_w2_EDF = _segment_wgrad(g_y_AD, act_w_AF, counts, torch.empty_like(w2_EDF))
        g_w_A = torch.linalg.vecdot(g_act_w_AF, silu_AF * up_AF)  # recomputed: cheaper than keeping it
        g_act_AF = g_act_w_AF.mul_(w_A[:, None])
        g_gate_AF = torch.mul(g_act_AF, up_AF, out=_buffers.get("g_gate", (A, F_), x_AD))
        torch.ops.aten.silu_backward(g_gate_AF, gate_AF, grad_input=g_gate_AF)
        g_up_AF = g_act_AF.mul_(silu_AF)
        w1_EFD, w3_EFD = w13_E2FD[:, :F_], w13_E2FD[:, F_:]
        g_x_AD = _segment_mm(g_gate_AF, w1_EFD, counts, _buffers.get("g_x", tuple(x_AD.shape), x_AD), transpose=False)
        _segment_mm(g_up_AF, w3_EFD, counts, g_x_AD, transpose=False, accumulate=True)
        g_w13_E2FD = torch.empty_like(w13_E2FD)
        _segment_wgrad(g_gate_AF, x_AD, counts, g_w13_E2FD[:, :F_])
        _segment_wgrad(g_up_AF, x_AD, counts, g_w13_E2FD[:, F_:])
        g_x_ND = g_out_ND.new_zeros(ctx.N, x_AD.shape[1]).index_add_(0, tok_A, g_x_AD)
        return g_x_ND, g_w_A, None, g_w13_E2FD, g_w2_EDF, None


# Up to this many tokens an inference call runs every expert as one fused product (`Experts.forward_fused`): a
# decode step or a short prefill then costs a few large GEMMs instead of two per expert segment and a host sync.
# It reads all E experts' weights, not the K chosen; on a 2-core CPU it still decodes faster than the segment path
# at batch 1, 4 and 16, and reading only the chosen experts (grouped_mm) was no faster (docs/benchmarks.md,
# "decoding at small token counts").
FUSED_MAX_TOKENS = 64


class Experts(nn.Module):
    """E routed SwiGLU experts as stacked weights: `w13` (E, 2F, D) gate|up, `w2` (E, D, F) down.

    `impl` "loop" always runs the oracle; "batched" runs the fused path for inference calls of at most
    `FUSED_MAX_TOKENS` tokens and the sorted-segment path otherwise (training always: it has the hand-written
    backward).
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, impl: str):
        super().__init__()
        self.impl = impl
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w2_fused = DerivedLayout()  # w2 as (D, E·F), for the fused path

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
        if self.impl == "loop":
            return self.forward_loop(x_ND, weights_NK, ids_NK)
        if x_ND.shape[0] <= FUSED_MAX_TOKENS and not (torch.is_grad_enabled() and self.w13.requires_grad):
            return self.forward_fused(x_ND, weights_NK, ids_NK)
        return self.forward_batched(x_ND, weights_NK, ids_NK)

    def forward_loop(self, x_ND, weights_NK, ids_NK) -> torch.Tensor:
        """Reference: for each expert, mask its tokens, run it, add the weighted result. The test oracle."""
        out_ND = torch.zeros_like(x_ND)
        for e in range(self.w13.shape[0]):
            tok_idx, k_idx = torch.where(ids_NK == e)
            if tok_idx.numel() == 0:
                continue
            gate, up = F.linear(x_ND[tok_idx], self.w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e])
            out_ND = out_ND.index_add(0, tok_idx, y * weights_NK[tok_idx, k_idx, None].to(y.dtype))
        return out_ND

    def forward_batched(self, x_ND, weights_NK, ids_NK) -> torch.Tensor:
        """Dropless: sort token-expert assignments by expert, one GEMM pair per expert segment, weighted scatter-add."""
        K = ids_NK.shape[1]
        ids_A = ids_NK.flatten()  # assignment a = n*K + k
        order_A = ids_A.argsort(stable=True)
        counts = torch.bincount(ids_A, minlength=self.w13.shape[0]).tolist()  # the one host sync
        w_A = weights_NK.flatten().index_select(0, order_A).to(x_ND.dtype)
        return _RoutedExperts.apply(x_ND, w_A, order_A // K, self.w13, self.w2, counts)

    def forward_fused(self, x_ND, weights_NK, ids_NK) -> torch.Tensor:
        """Every expert on every token in two GEMMs, the unchosen ones weighted 0: no loop, no host sync.

        `w13` viewed as one (E·2F, D) matrix gives every expert's gate and up at once; the routing weights,
        scattered into an (N, E) matrix, scale each expert's activation; `w2` laid out as one (D, E·F) matrix sums
        the weighted experts in the second GEMM. For inference only (no autograd through the cached layout).
        """
        N, D = x_ND.shape
        E, F2, F_ = self.w13.shape[0], self.w13.shape[1], self.w2.shape[2]
        h_NE2F = F.linear(x_ND, self.w13.view(E * F2, D)).view(N, E, F2)
        gate_NEF, up_NEF = h_NE2F.split(F_, dim=-1)
        route_NE = torch.zeros(N, E, dtype=x_ND.dtype, device=x_ND.device)
        route_NE.scatter_(1, ids_NK, weights_NK.to(x_ND.dtype))
        act_NEF = F.silu(gate_NEF) * up_NEF * route_NE[..., None]
        w2_DA = self.w2_fused.get(self.w2, lambda w_EDF: w_EDF.permute(1, 0, 2).reshape(D, E * F_).contiguous())
        return F.linear(act_NEF.view(N, E * F_), w2_DA)


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
        x_ND = x_BSD.reshape(B * S, D)
        weights_NK, ids_NK, scores_NE = self.gate(x_ND)
        out_ND = self.experts(x_ND, weights_NK, ids_NK)
        if self.shared is not None:
            out_ND = out_ND + self.shared(x_ND)
        if self.training:
            with torch.no_grad():
                self.gate.counts += torch.bincount(ids_NK.flatten(), minlength=self.n_experts).to(self.gate.counts)
            self.balance_loss = self._sequence_balance_loss(scores_NE.view(B, S, -1), ids_NK.view(B, S, -1))
        return out_ND.view(B, S, D)

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
