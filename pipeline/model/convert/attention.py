"""GQA attention → MLA: partial RoPE on the channel pairs that carry the most q·k norm, the rest of the keys and the
values jointly low-rank.

Partial RoPE keeps, per KV head, the channel pairs with the most q·k norm (MHA2MLA's 2-norm criterion); the rest
of the key and the whole value are compressed jointly into the latent by an activation-aware SVD (MHA2MLA's joint
SVD, whitened by the calibration inputs so the error is measured on real activations). Each KV head keeps its own
rope key (`n_rope_heads`): DeepSeek's one shared rope key cannot hold a GQA teacher's three differently-rotated
keys without loss, and this way the conversion is exact at full rank.
"""

from __future__ import annotations

import torch

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
    H, G, hd, D = shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.dim
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
    if mla.n_rope_heads == 1 and G > 1:  # one rope key for every head: the KV heads' rope keys averaged
        if not all(torch.equal(pairs_Gp[0], p) for p in pairs_Gp):
            raise ConversionError("a shared rope key needs the same rope pairs on every KV head")
        w_rope = torch.stack([wk[r] for r in k_rope_rows]).mean(0)  # (R, D)
    else:
        w_rope = torch.cat([wk[r] for r in k_rope_rows])  # (G·R, D)
    q_idx = torch.cat(q_rows)
    mla.wq.weight.copy_(wq[q_idx])
    # stacked [k_nope_g ; v_g] per KV head, (G·(U + O), D): the rows the latent must reproduce
    w_kv = torch.cat([torch.cat([wk[k_nope_rows[g]], wv[g * hd : (g + 1) * hd]]) for g in range(G)])
    if moment_DD is None:
        moment_DD = torch.eye(D, dtype=torch.float64)
    L = _whitener(moment_DD)
    left, _, _ = torch.linalg.svd(w_kv.double() @ L, full_matrices=False)
    basis = left[:, :C]  # (G·(U + O), C): the top C left singular vectors
    down = (basis.T @ w_kv.double()).to(mla.wkv_a.weight.dtype)
    mla.wkv_a.weight.copy_(torch.cat([down, w_rope]))
    up = basis.to(mla.wkv_b.weight.dtype).view(G, -1, C)  # (G, U + O, C)
    mla.wkv_b.weight.copy_(up.repeat_interleave(group, dim=0).reshape(-1, C))
    mla.wo.weight.copy_(hf_attn.o_proj.weight)
    if bias:
        bq, bk, bv = hf_attn.q_proj.bias, hf_attn.k_proj.bias, hf_attn.v_proj.bias
        mla.wq.bias.copy_(bq[q_idx])
        b_kv = torch.cat([torch.cat([bk[k_nope_rows[g]], bv[g * hd : (g + 1) * hd]]) for g in range(G)])
        rope_b = torch.stack([bk[r] for r in k_rope_rows])
        rope_b = rope_b.mean(0) if mla.n_rope_heads == 1 else rope_b.flatten()
        mla.wkv_a.bias.copy_(torch.cat([(basis.T @ b_kv.double()).to(b_kv.dtype), rope_b]))
    mla.inv_freq.copy_(inv_freq_P[pairs_Gp[: mla.n_rope_heads]])
    assert mla.inv_freq.shape == (mla.n_rope_heads, n_keep)
