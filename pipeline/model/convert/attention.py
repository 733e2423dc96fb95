"""GQA attention → MLA: partial RoPE on the channel pairs that carry the most q·k norm, the rest of the keys and the
values jointly low-rank.

Partial RoPE keeps, per KV head, the channel pairs with the most q·k norm (MHA2MLA's 2-norm criterion); the rest
of the key and the whole value are compressed jointly into the latent by an activation-aware SVD (MHA2MLA's joint
SVD, whitened by the calibration inputs so the error is measured on real activations). Each KV head keeps its own
rope key (`n_rope_heads`): DeepSeek's one shared rope key cannot hold a GQA teacher's three differently-rotated
keys without loss, and this way the conversion is exact at full rank (`convert_attention`, the exact layout).

The standard layout (`convert_attention_standard`) is DeepSeek-V3's, which every engine runs: one rope key for all
heads. Per kept frequency, the KV heads' rope components are rotated together by an orthogonal transform across
the heads (TransMLA's RoRoPE: a real mixing of the heads' complex components commutes with RoPE), chosen by PCA so
that the first component carries the most key energy; that component becomes the shared rope key, and what it
leaves of each head's key (the residual) joins the latent without rotation. The kept frequencies are the
teacher's leading pairs, which are the standard ones at rope_theta' = rope_theta^(R / head_dim).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.convert.shapes import ConversionError, TeacherShape
from pipeline.model.mla import MLA


def rope_pairs(pair_norm_GP: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Per KV head, the `n_pairs` channel pairs with the largest q·k norm, in ascending order: (G, n_pairs)."""
    return pair_norm_GP.topk(n_pairs, dim=-1).indices.sort(dim=-1).values


def _whitener(moment_DD: torch.Tensor) -> torch.Tensor:
    """L with L L^T = the input's second moment (damped so it is positive definite)."""
    m = moment_DD.double()
    damp = 1e-6 * m.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.cholesky(m + damp * torch.eye(m.shape[0], dtype=m.dtype))


def _latent_basis(w_kv: torch.Tensor, moment_DD: torch.Tensor | None, rank: int) -> torch.Tensor:
    """The top `rank` left singular vectors of (W_kv L), L whitening the attention input: (rows of W_kv, rank)."""
    if moment_DD is None:
        moment_DD = torch.eye(w_kv.shape[1], dtype=torch.float64)
    left, _, _ = torch.linalg.svd(w_kv.double() @ _whitener(moment_DD), full_matrices=False)
    return left[:, :rank]


@torch.no_grad()
def convert_attention(
    hf_attn,
    mla: MLA,
    shape: TeacherShape,
    pairs_Gp: torch.Tensor,
    inv_freq_P: torch.Tensor,
    moment_DD: torch.Tensor | None,
) -> None:
    """One GQA attention layer into `mla` (partial RoPE on `pairs_Gp`, joint low-rank keys and values).

    Query/key channels of head g split into rope channels (the kept pairs, interleaved as our RoPE rotates them)
    and the rest (nope). The nope keys and the values of all KV heads are stacked and projected onto the top
    `kv_lora_rank` left singular vectors of (W_kv L), L whitening the calibration inputs: the latent is
    basis^T W_kv x, its up-projection the basis. With every pair kept and full rank, the basis is orthogonal and
    nothing changes.
    """
    H, G, hd = shape.n_heads, shape.n_kv_heads, shape.head_dim
    P, group = hd // 2, H // G
    n_keep = pairs_Gp.shape[1]
    C = mla.kv_rank

    def layouts(g: int) -> tuple[torch.Tensor, torch.Tensor]:
        kept = pairs_Gp[g]
        rest = torch.tensor([i for i in range(P) if i not in set(kept.tolist())], dtype=torch.long)
        nope = torch.cat([rest, rest + P])
        rope = torch.stack([kept, kept + P], dim=1).flatten()  # (x_i, x_{i+P}) pairs, interleaved
        return nope, rope

    wq, wk, wv = hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight
    bias = hf_attn.q_proj.bias is not None
    q_rows, k_nope_rows, k_rope_rows = [], [], []
    for h in range(H):
        nope, rope = layouts(h // group)
        q_rows.append(torch.cat([nope, rope]) + h * hd)
    for g in range(G):
        nope, rope = layouts(g)
        k_nope_rows.append(nope + g * hd)
        k_rope_rows.append(rope + g * hd)
    if mla.n_rope_heads != G:
        raise ConversionError(f"the exact layout keeps one rope key per KV head ({G}), not {mla.n_rope_heads}")
    w_rope = torch.cat([wk[r] for r in k_rope_rows])  # (G·R, D)
    q_idx = torch.cat(q_rows)
    mla.wq.weight.copy_(wq[q_idx])
    # stacked [k_nope_g ; v_g] per KV head, (G·(U + O), D): the rows the latent must reproduce
    w_kv = torch.cat([torch.cat([wk[k_nope_rows[g]], wv[g * hd : (g + 1) * hd]]) for g in range(G)])
    basis = _latent_basis(w_kv, moment_DD, C)
    down = (basis.T @ w_kv.double()).to(mla.wkv_a.weight.dtype)
    mla.wkv_a.weight.copy_(torch.cat([down, w_rope]))
    up = basis.to(mla.wkv_b.weight.dtype).view(G, -1, C)  # (G, U + O, C)
    mla.wkv_b.weight.copy_(up.repeat_interleave(group, dim=0).reshape(-1, C))
    mla.wo.weight.copy_(hf_attn.o_proj.weight)
    if bias:
        bq, bk, bv = hf_attn.q_proj.bias, hf_attn.k_proj.bias, hf_attn.v_proj.bias
        mla.wq.bias.copy_(bq[q_idx])
        b_kv = torch.cat([torch.cat([bk[k_nope_rows[g]], bv[g * hd : (g + 1) * hd]]) for g in range(G)])
        rope_b = torch.cat([bk[r] for r in k_rope_rows])
        mla.wkv_a.bias.copy_(torch.cat([(basis.T @ b_kv.double()).to(b_kv.dtype), rope_b]))
    mla.inv_freq.copy_(inv_freq_P[pairs_Gp[: mla.n_rope_heads]])
    assert mla.inv_freq.shape == (mla.n_rope_heads, n_keep)


def _norm_anchor(moment_DD: torch.Tensor, mean_D: torch.Tensor) -> torch.Tensor:
    """The input direction a whose projection a·x varies least relative to its mean over the calibration tokens,
    scaled so that mean is 1: a = Σ⁻¹μ / (μᵀΣ⁻¹μ), Σ the inputs' covariance, μ their mean. (D,)"""
    mu = mean_D.double()
    cov = moment_DD.double() - torch.outer(mu, mu)
    damp = 1e-6 * cov.diagonal().mean().clamp_min(1e-12)
    a = torch.linalg.solve(cov + damp * torch.eye(cov.shape[0], dtype=cov.dtype), mu)
    return a / (a @ mu)


# the anchor sizes tried, as its RMS over the rest of the latent's (0: no anchor); the one whose normed latent is
# nearest the unnormed one on the calibration sample wins
ANCHOR_RATIOS = (0.0, 2.0, 4.0, 8.0, 16.0)


def _fit_latent_norm(
    down_CD: torch.Tensor, x_ND: torch.Tensor, eps: float, anchored: bool
) -> tuple[torch.Tensor, float]:
    """The RMSNorm weight that makes the normed latent nearest the latent on the sample x (least squares per
    channel), and the relative error left on the channels that feed keys and values (all but an anchor):
    (weight (C,), error)."""
    c_NC = x_ND.double() @ down_CD.T
    inv_rms_N1 = (c_NC.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    w_C = (c_NC.pow(2) * inv_rms_N1).sum(0) / (c_NC.pow(2) * inv_rms_N1.pow(2)).sum(0).clamp_min(1e-30)
    used_NC = c_NC[:, int(anchored) :]
    miss_NC = (c_NC * inv_rms_N1 * w_C)[:, int(anchored) :] - used_NC
    return w_C, float(miss_NC.pow(2).sum() / used_NC.pow(2).sum().clamp_min(1e-30))


def _latent_with_norm(
    w_kv: torch.Tensor, M: torch.Tensor, rank: int, mean_D: torch.Tensor | None, sample_ND: torch.Tensor | None, eps
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The latent's down- and up-projections and its norm weight: (down (C, D), up (rows, C), weight (C,), ratio).

    An anchor of `ratio` (see ANCHOR_RATIOS) is channel 0, with a zero up-projection column and a zero norm weight:
    it still sets every token's RMS, but its normed value is 0, so neither its column nor its weight ever gets a
    gradient (a normed anchor, ~sqrt(C) x the rest, made the first optimizer step on its zero column blow the
    student up: loss 2.9 -> 7.3 on SmolLM2)."""
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None
    best_error = float("inf")
    ratios = ANCHOR_RATIOS if mean_D is not None and sample_ND is not None and rank > 1 else (0.0,)
    for ratio in ratios:
        up = _latent_basis(w_kv, M, rank - (ratio > 0))
        if up.shape[1] < rank - (ratio > 0):  # more channels than the keys and values have rank: unused ones
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - (ratio > 0) - up.shape[1])], dim=1)
        down = up.T @ w_kv
        if ratio > 0:
            assert mean_D is not None
            a_D = _norm_anchor(M, mean_D)
            rest_square = torch.einsum("cd,de,ce->", down, M, down)
            down = torch.cat([ratio * (rest_square / (a_D @ M @ a_D)).sqrt() * a_D[None], down])
            up = torch.cat([torch.zeros(up.shape[0], 1, dtype=up.dtype), up], dim=1)
        if sample_ND is None:  # no sample: the latent's RMS under the second moment, in every channel
            weight = (torch.einsum("cd,de,ce->", down, M, down) / rank).sqrt().expand(rank)
            return down, up, weight, ratio
        weight, error = _fit_latent_norm(down, sample_ND, eps, anchored=ratio > 0)
        if ratio > 0:  # the anchor only sets the RMS: normed to 0, it feeds nothing and gets no gradient
            weight[0] = 0.0
        if error < best_error:
            best, best_error = (down, up, weight, ratio), error
    assert best is not None
    return best


@torch.no_grad()
def convert_attention_standard(
    hf_attn,
    mla: MLA,
    shape: TeacherShape,
    moment_DD: torch.Tensor | None,
    mean_D: torch.Tensor | None = None,
    sample_ND: torch.Tensor | None = None,
) -> tuple[float, float, float]:
    """One GQA attention layer into `mla` in DeepSeek-V3's layout; returns the share of the kept frequencies' key
    energy the shared rope key holds (1.0: lossless, as for a single KV head), the latent's anchor ratio and the
    scale moved from the latent norm's weight into the up-projection (below).

    Rope: per query head h (KV head g), channel pair i of the teacher splits as q_i·k_gi = u_ig (q_i·k'_i) + q_i·r_gi,
    where k'_i = sum_g u_ig k_gi is the shared rope key (u_i the top principal direction of the heads' components
    of pair i under the input's second moment) and r_gi = k_gi - u_ig k'_i the residual. The first term keeps its
    rotation (query rows scaled by u_ig); the residual and the pairs not kept go to the non-rotary part unrotated,
    which is the layout's one approximation of the teacher's scores.

    Latent: the non-rotary keys and the values are compressed into the latent as in `convert_attention`. The
    latent RMSNorm divides every token's latent by its RMS, which the teacher never did: a token whose latent is
    small gets its keys and values scaled up. So the first latent channel may be an anchor, a few times the rest
    in RMS, along the input direction whose projection is most nearly constant across tokens (`_norm_anchor`); it
    feeds no key or value (zero up-projection), but it makes every token's RMS nearly the same, and the norm's
    weight (fitted on the calibration sample `sample_ND`, least squares per channel) undoes it. The anchor's size,
    none included, is the one whose normed latent is nearest the latent on that sample. (On SmolLM2, whose
    attention inputs share a large common component, the weight alone left the converted student an order of
    magnitude further from the teacher in KL than with the anchor.) Without a sample: no anchor, a uniform weight.
    Either way the weight's common scale is then moved into the up-projection (the weight has RMS 1), which keeps
    the function and keeps AdamW's steps on the up-projection small relative to it.

    Biases are dropped (the standard layout has none): a key bias on non-rotary channels adds a constant per query
    and changes nothing; the query, value and rotary key biases do.
    """
    H, G, hd, D = shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.dim
    P, group, n, C = hd // 2, H // G, mla.rope // 2, mla.kv_rank
    if mla.n_rope_heads != 1 or mla.nope != hd:
        raise ConversionError("the standard layout shares one rope key and keeps every channel in the non-rotary part")
    M = torch.eye(D, dtype=torch.float64) if moment_DD is None else moment_DD.double()
    kept, rest = torch.arange(n), torch.arange(n, P)
    wk_GhD = hf_attn.k_proj.weight.double().view(G, hd, D)
    re_GnD, im_GnD = wk_GhD[:, kept], wk_GhD[:, kept + P]  # pair i of head g as a complex row: re + j·im
    cov_nGG = torch.einsum("gnd,de,hne->ngh", re_GnD, M, re_GnD) + torch.einsum("gnd,de,hne->ngh", im_GnD, M, im_GnD)
    energy_nG, vectors_nGG = torch.linalg.eigh(cov_nGG)  # ascending eigenvalues
    u_nG = vectors_nGG[..., -1]
    u_nG = u_nG * torch.where(u_nG.sum(-1, keepdim=True) < 0, -1.0, 1.0)  # a fixed sign, for reproducibility
    kept_share = float(energy_nG[:, -1].sum() / energy_nG.sum().clamp_min(1e-30))
    shared_re_nD = torch.einsum("ng,gnd->nd", u_nG, re_GnD)
    shared_im_nD = torch.einsum("ng,gnd->nd", u_nG, im_GnD)
    res_re_GnD = re_GnD - u_nG.T[:, :, None] * shared_re_nD
    res_im_GnD = im_GnD - u_nG.T[:, :, None] * shared_im_nD
    # non-rotary channels of each KV head, in this order: the pairs not kept (both halves), the kept pairs' residuals
    k_nope_GhD = torch.cat([wk_GhD[:, rest], wk_GhD[:, rest + P], res_re_GnD, res_im_GnD], dim=1)
    wq_HhD = hf_attn.q_proj.weight.double().view(H, hd, D)
    u_Hn = u_nG.T.repeat_interleave(group, dim=0)  # each query head weighs the shared key by its KV head's u
    q_nope_HhD = torch.cat([wq_HhD[:, rest], wq_HhD[:, rest + P], wq_HhD[:, kept], wq_HhD[:, kept + P]], dim=1)
    q_rope_HnD2 = torch.stack([u_Hn[..., None] * wq_HhD[:, kept], u_Hn[..., None] * wq_HhD[:, kept + P]], dim=2)
    # the student scales scores by (head_dim + R)^-1/2, the teacher by head_dim^-1/2
    q_scale = (mla.nope + mla.rope) ** 0.5 / hd**0.5
    wq = torch.cat([q_nope_HhD, q_rope_HnD2.reshape(H, 2 * n, D)], dim=1) * q_scale
    mla.wq.weight.copy_(wq.reshape(H * (hd + 2 * n), D))
    wv_GhD = hf_attn.v_proj.weight.double().view(G, hd, D)
    w_kv = torch.cat([k_nope_GhD, wv_GhD], dim=1).reshape(G * 2 * hd, D)  # stacked [k_nope_g ; v_g]
    down, basis, norm_weight, ratio = _latent_with_norm(
        w_kv, M, C, mean_D, sample_ND, float(getattr(mla.kv_norm, "eps", 1e-6))
    )
    # the norm weight as fitted is the latent's typical RMS (~33 in SmolLM2's layers), with the up-projection
    # correspondingly small: AdamW moves every entry by ~lr whatever its size, so that up-projection changed ~30x
    # faster, relative to itself, than the rest of the student, and training diverged within 3 steps (loss 1.1 ->
    # 5.6). The same function with the weight's common scale moved into the up-projection (RMS 1 over the channels
    # that feed keys and values, as a fresh DeepSeek-V3 norm starts) trains as steadily as the exact layout.
    scale = norm_weight[int(ratio > 0) :].pow(2).mean().sqrt().clamp_min(1e-12)
    norm_weight, basis = norm_weight / scale, basis * scale
    rope_rows = torch.stack([shared_re_nD, shared_im_nD], dim=1).reshape(2 * n, D)  # interleaved (re, im) pairs
    mla.wkv_a.weight.copy_(torch.cat([down, rope_rows]))
    mla.wkv_b.weight.copy_(basis.view(G, 2 * hd, C).repeat_interleave(group, dim=0).reshape(-1, C))
    mla.wo.weight.copy_(hf_attn.o_proj.weight)
    assert isinstance(mla.kv_norm, nn.Module) and isinstance(mla.kv_norm.weight, torch.Tensor)
    mla.kv_norm.weight.copy_(norm_weight)
    return kept_share, ratio, float(scale)
