"""Dense FFN → DeepSeekMoE: the most-activated neurons form the shared expert, the rest equal routed experts.

The routed neurons are split into equal experts by balanced k-means on their co-activation (CMoE, LLaMA-MoE v2),
and the router is fitted to predict each expert's activation mass. Chosen experts weigh 1 (`route_weight: unit`),
so with every expert active the layer is the dense FFN. In DeepSeek-V3's layout (`route_weight: normalized`,
`route_scale` = k) a chosen expert weighs k·s_i / sum of the chosen s, which is 1 when the chosen sigmoid
affinities s are equal: the router is scaled down (`logit_std`) so that they nearly are at conversion (exactly
in the limit), while their order, hence the choice, is the fitted router's.
"""

from __future__ import annotations

import torch

from pipeline.model.convert.calibration import LayerStats
from pipeline.model.convert.shapes import ConversionError
from pipeline.model.moe import MoE


def balanced_kmeans(features_FN: torch.Tensor, n_clusters: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Cluster F rows into `n_clusters` groups of exactly F / n_clusters (greedy balanced assignment).

    Rows are neurons, described by their activation on N sample tokens; they should be normalised: distance is
    Euclidean. Returns the cluster of each row, (F,).
    """
    rows = features_FN.shape[0]
    if rows % n_clusters:
        raise ConversionError(f"{rows} neurons do not split into {n_clusters} equal experts")
    size = rows // n_clusters
    gen = torch.Generator().manual_seed(seed)
    centers_EN = features_FN[torch.randperm(rows, generator=gen)[:n_clusters]].clone()
    assign_F = torch.zeros(rows, dtype=torch.long)
    for _ in range(iters):
        dist_FE = torch.cdist(features_FN, centers_EN)
        order = dist_FE.flatten().argsort()
        fill = [0] * n_clusters
        done_F = torch.zeros(rows, dtype=torch.bool)
        left = rows
        for flat in order.tolist():
            f, e = divmod(flat, n_clusters)
            if done_F[f] or fill[e] == size:
                continue
            assign_F[f], done_F[f] = e, True
            fill[e] += 1
            left -= 1
            if left == 0:
                break
        new_EN = torch.stack([features_FN[assign_F == e].mean(0) for e in range(n_clusters)])
        if torch.allclose(new_EN, centers_EN):
            break
        centers_EN = new_EN
    return assign_F


@torch.no_grad()
def convert_ffn(
    hf_mlp, moe: MoE, stats: LayerStats | None, n_shared: int, expert_width: int, seed: int = 0, logit_std: float = 1.0
) -> dict:
    """One dense SwiGLU FFN into shared + routed experts; returns which neurons went where.

    Shared: the `n_shared` neurons of the largest mean |activation|. Routed: the next E·width neurons (fewer
    only when the experts hold less than the FFN), in E balanced clusters of co-activation (each neuron's
    normalised |activation| over the calibration sample). Router: least squares from the FFN input to each
    expert's activation mass on the sample, scaled so its logits' standard deviation on the sample is `logit_std`
    (1: the sigmoid starts unsaturated; small: nearly equal affinities, see the module docstring). Without `stats`:
    neurons in index order, contiguous experts, a zero router.
    """
    gate, up, down = hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight, hf_mlp.down_proj.weight
    E = moe.n_experts
    order = stats.ffn_mass_F.argsort(descending=True) if stats is not None else torch.arange(gate.shape[0])
    shared_idx = order[:n_shared].sort().values
    routed_pool = order[n_shared : n_shared + E * expert_width]
    if stats is not None:
        feats_FN = stats.ffn_act_NF[:, routed_pool].abs().T.float()
        feats_FN = feats_FN / feats_FN.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cluster = balanced_kmeans(feats_FN, E, seed=seed)
    else:
        cluster = torch.arange(E * expert_width) // expert_width
    experts = [routed_pool[cluster == e].sort().values for e in range(E)]
    idx_EF = torch.stack(experts)
    moe.experts.w13.copy_(torch.cat([gate[idx_EF], up[idx_EF]], dim=1))
    moe.experts.w2.copy_(down[:, idx_EF].permute(1, 0, 2))
    if moe.shared is not None:
        moe.shared.w13.weight.copy_(torch.cat([gate[shared_idx], up[shared_idx]]))
        moe.shared.w2.weight.copy_(down[:, shared_idx])
    moe.gate.bias.zero_()
    if stats is None:
        moe.gate.weight.zero_()
        return {"shared": shared_idx.tolist(), "experts": [e.tolist() for e in experts]}
    x_ND = stats.ffn_in_ND.double()
    mass_NE = torch.stack([stats.ffn_act_NF[:, i].abs().sum(1) for i in experts], dim=1).double()
    mass_NE = (mass_NE - mass_NE.mean(0)) / mass_NE.std(0).clamp_min(1e-12)
    ridge = 1e-3 * x_ND.pow(2).sum(0).mean()
    w_DE = torch.linalg.solve(x_ND.T @ x_ND + ridge * torch.eye(x_ND.shape[1], dtype=x_ND.dtype), x_ND.T @ mass_NE)
    logits_NE = x_ND @ w_DE
    moe.gate.weight.copy_((w_DE * (logit_std / logits_NE.std().clamp_min(1e-12))).T.to(moe.gate.weight.dtype))
    return {"shared": shared_idx.tolist(), "experts": [e.tolist() for e in experts]}
