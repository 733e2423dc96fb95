"""Multi-head Latent Attention (DeepSeek-V2/V3) with a latent KV cache.

Leaves first: RMSNorm, rotary embedding, the cache, then the attention module. Shape suffixes: the legend in
`pipeline/model/__init__.py` (here chiefly B, S, T, H, G, C, U, R, O).

MLA compresses keys and values into one latent vector per token (`kv_lora_rank` wide) plus a small rotary key shared
by all heads (or, in a student converted from a GQA teacher, one per KV head); only those are cached. Two ways to
attend over the cache:

- `naive`: expand every cached latent to full per-head keys and values with `wkv_b`, then ordinary attention.
  Simple and obviously right; kept as the oracle.
- `absorb`: fold `wkv_b`'s key half into the query and its value half into the output, so attention runs
  directly against the latents. Per decoded token this costs O(T·H·(C+R)) instead of O(T·C·H·(U+O)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.reused_tensors import DerivedLayout


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# ---------------------------------------------------------------------------------------------------- rotary


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """The standard RoPE angular frequency of each channel pair: (head_dim // 2,)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_angles(pos_BS: torch.Tensor, inv_freq_GP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of every position's angle for each rope head's channel pairs: two (B, S, G, P) tensors.

    Angles are computed from the frequencies each layer stores (not a shared table): a student converted from a
    teacher keeps, per layer and per key head, the teacher's frequencies that carry the most q·k mass.
    """
    angles_BSGP = pos_BS[:, :, None, None].float() * inv_freq_GP.float()
    return angles_BSGP.cos(), angles_BSGP.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x0, x1), (x2, x3), … of x (..., R) by per-position angles.

    cos/sin broadcast against x[..., ::2]. The result is laid out de-interleaved ([evens | odds] rotated), a fixed
    permutation applied to queries and keys alike, so dot products are exactly those of the interleaved rotation.
    The rotation runs in fp32 (angles of late positions need its mantissa) and returns x's dtype.
    """
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- cache


class LatentKVCache:
    """Per layer, per slot: the normalised KV latent (C) and the rotated rope keys (G·R) of each token.

    Slots let a server add and remove sequences between decode steps: `allocate()` a slot for a new sequence,
    prefill it, decode any subset of slots together, `free()` it when the sequence ends. `lengths[slot]` is how
    many tokens the slot holds.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_layers: int,
        max_batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.max_batch, self.max_len = max_batch, max_len
        G, R = cfg.n_rope_heads, cfg.qk_rope_head_dim
        self.kv_LBTC = torch.zeros(n_layers, max_batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        # the rope keys, one per rope-key head (G is 1 in DeepSeek's layout, the teacher's KV heads when converted)
        self.pe_LBTGR = torch.zeros(n_layers, max_batch, max_len, G, R, device=device, dtype=dtype)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._free = list(range(max_batch))

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"latent KV cache is full ({self.max_batch} sequences)")
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} is not in use")
        self.lengths[slot] = 0
        self._free.append(slot)
        self._free.sort()

    @property
    def bytes_per_token_per_layer(self) -> int:
        G, R = self.pe_LBTGR.shape[-2:]
        return (self.kv_LBTC.shape[-1] + G * R) * self.kv_LBTC.element_size()


class CacheView:
    """What one forward call needs of the cache: which slots, where each row's new tokens start.

    Where the call's S new tokens go, how far every row's keys reach (T) and the causal mask are the same in every
    layer, so they are worked out once, at the first layer's `write`, and reused by the others. T is the longest
    row's end (one host sync per call), or with `static` the cache's whole length: every shape then depends on
    the batch alone, which a compiled decode step needs (the keys past each row's end are masked).
    """

    def __init__(self, cache: LatentKVCache, slots_B: torch.Tensor, start_B: torch.Tensor, static: bool = False):
        self.cache, self.slots_B, self.start_B, self.static = cache, slots_B, start_B, static
        self._S: int | None = None

    def _place(self, S: int) -> None:
        device = self.start_B.device
        self._S = S
        self._pos_BS = self.start_B[:, None] + torch.arange(S, device=device)
        self._rows_BS = self.slots_B[:, None].expand_as(self._pos_BS)
        self._T = self.cache.max_len if self.static else int((self.start_B + S).max())  # the one host sync
        self._visible_BST = torch.arange(self._T, device=device)[None, None, :] <= self._pos_BS[:, :, None]
        self._bias_BS1T: torch.Tensor | None = None

    def write(self, layer: int, kv_BSC: torch.Tensor, pe_BSGR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's latents and rope keys; return every row's cached ones up to the longest row's end."""
        S = kv_BSC.shape[1]
        if self._S != S:
            self._place(S)
        kv_LBTC, pe_LBTGR = self.cache.kv_LBTC, self.cache.pe_LBTGR
        kv_LBTC[layer][self._rows_BS, self._pos_BS] = kv_BSC.to(kv_LBTC.dtype)
        pe_LBTGR[layer][self._rows_BS, self._pos_BS] = pe_BSGR.to(pe_LBTGR.dtype)
        return kv_LBTC[layer][self.slots_B, : self._T], pe_LBTGR[layer][self.slots_B, : self._T]

    def mask(self, S: int, T: int) -> torch.Tensor:
        """(B, 1, S, T) boolean: query s of row b sees cached key t iff t <= start_b + s."""
        if self._S != S:
            self._place(S)
        return self._visible_BST[:, None, :, :T]

    def score_bias(self, S: int) -> torch.Tensor:
        """(B, S, 1, T) additive mask: 0 where query s of row b sees key t, -inf where it does not."""
        if self._S != S:
            self._place(S)
        if self._bias_BS1T is None:  # built once per forward call, at the first layer that asks
            zeros = torch.zeros(self._visible_BST.shape, dtype=self.cache.kv_LBTC.dtype, device=self.start_B.device)
            self._bias_BS1T = zeros.masked_fill_(~self._visible_BST, float("-inf"))[:, :, None]
        return self._bias_BS1T


# ---------------------------------------------------------------------------------------------------- attention


class MLA(nn.Module):
    """Multi-head Latent Attention.

    DeepSeek-V3 caches one rope key shared by every head (`n_rope_heads` 1). A student converted from a GQA
    teacher may keep one rope key per KV head instead (`n_rope_heads` = the teacher's KV heads; query head h uses
    rope key h // (H / G)): the teacher's positional keys then survive the conversion exactly. Each layer stores
    its rope frequencies (`inv_freq`, (G, P)), since a conversion keeps different channel pairs per layer and head.

    Args:
        cfg: the model config (`n_heads`, `q_lora_rank`, `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`,
            `n_rope_heads`, `v_head_dim`, `kv_norm`, `qkv_bias`, `attn_impl`).
        layer_id: index of this layer in the cache.
    """

    inv_freq: torch.Tensor  # buffer, declared for type checkers

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_rope_heads, self.impl = cfg.n_heads, cfg.n_rope_heads, cfg.attn_impl
        self.nope, self.rope, self.v_dim, self.kv_rank = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        qk_dim = self.nope + self.rope
        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, self.n_heads * qk_dim, bias=cfg.qkv_bias)
        else:  # low-rank query path, as in DeepSeek-V3
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * qk_dim, bias=cfg.qkv_bias)
        self.wkv_a = nn.Linear(cfg.dim, self.kv_rank + self.n_rope_heads * self.rope, bias=cfg.qkv_bias)
        # a converted student drops the latent norm: the teacher's keys and values are linear in its input
        self.kv_norm = RMSNorm(self.kv_rank, cfg.norm_eps) if cfg.kv_norm else nn.Identity()
        self.wkv_b = nn.Linear(self.kv_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, cfg.dim, bias=False)
        self.scale = qk_dim**-0.5
        freqs = rope_frequencies(self.rope, cfg.rope_theta)
        self.register_buffer("inv_freq", freqs.expand(self.n_rope_heads, -1).clone())
        self.absorbed = DerivedLayout()  # W_UK as (H, U, C) and W_UV as (H, C, O), for the absorbed path

    def _queries(self, x_BSD: torch.Tensor) -> torch.Tensor:
        q = self.wq(x_BSD) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        return q.view(*x_BSD.shape[:2], self.n_heads, self.nope + self.rope)  # (B, S, H, Q)

    def forward(self, x_BSD: torch.Tensor, pos_BS: torch.Tensor, cache: CacheView | None = None) -> torch.Tensor:
        """Attend causally. Without a cache: a whole sequence (training). With one: new tokens after cached ones.

        Args:
            x_BSD: the normalised hidden states of the new tokens.
            pos_BS: each new token's position.
            cache: where to store this call's latents and read earlier ones.
        """
        B, S, _ = x_BSD.shape
        G, per_group = self.n_rope_heads, self.n_heads // self.n_rope_heads
        cos_BSGP, sin_BSGP = rope_angles(pos_BS, self.inv_freq)
        q_BSHQ = self._queries(x_BSD)
        q_nope_BSHU, q_pe_BSHR = q_BSHQ.split([self.nope, self.rope], dim=-1)
        # query head h turns with rope key h // per_group: view the heads as (G, per_group), broadcast the angles
        q_pe_BSGhR = apply_rope(
            q_pe_BSHR.view(B, S, G, per_group, self.rope), cos_BSGP[..., None, :], sin_BSGP[..., None, :]
        )
        q_pe_BSHR = q_pe_BSGhR.view(B, S, self.n_heads, self.rope)

        kv_BSC, k_pe = self.wkv_a(x_BSD).split([self.kv_rank, G * self.rope], dim=-1)  # k_pe: (B, S, G·R)
        kv_BSC = self.kv_norm(kv_BSC)
        k_pe_BSGR = apply_rope(k_pe.view(B, S, G, self.rope), cos_BSGP, sin_BSGP)

        if cache is None:
            mask = None
            kv_BTC, pe_BTGR = kv_BSC, k_pe_BSGR
        else:
            kv_BTC, pe_BTGR = cache.write(self.layer_id, kv_BSC, k_pe_BSGR)

        if self.impl == "naive" or cache is None:
            mask = None if cache is None else cache.mask(S, kv_BTC.shape[1])
            out_BSHO = self._attend_naive(q_nope_BSHU, q_pe_BSHR, kv_BTC, pe_BTGR, mask)
        else:
            out_BSHO = self._attend_absorb(q_nope_BSHU, q_pe_BSHR, kv_BTC, pe_BTGR, cache.score_bias(S))
        return self.wo(out_BSHO.reshape(B, S, self.n_heads * self.v_dim))

    def _attend_naive(self, q_nope_BSHU, q_pe_BSHR, kv_BTC, pe_BTGR, mask) -> torch.Tensor:
        """Expand latents to per-head K and V, then standard scaled-dot-product attention."""
        B, T, _ = kv_BTC.shape
        kv = self.wkv_b(kv_BTC).view(B, T, self.n_heads, self.nope + self.v_dim)  # (B, T, H, U + O)
        k_nope_BTHU, v_BTHO = kv.split([self.nope, self.v_dim], dim=-1)
        pe_BTHR = pe_BTGR.repeat_interleave(self.n_heads // self.n_rope_heads, dim=2)
        k_BTHQ = torch.cat([k_nope_BTHU, pe_BTHR], dim=-1)
        q_BSHQ = torch.cat([q_nope_BSHU, q_pe_BSHR], dim=-1)
        out_BHSO = F.scaled_dot_product_attention(
            q_BSHQ.transpose(1, 2),
            k_BTHQ.transpose(1, 2),
            v_BTHO.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
        )
        return out_BHSO.transpose(1, 2)

    def _split_wkv_b(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`wkv_b` split per head into W_UK as (H, U, C) and W_UV transposed as (H, C, O), contiguous for `bmm`."""
        w_HYC = w.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        w_uk_HUC, w_uv_HOC = w_HYC.split([self.nope, self.v_dim], dim=1)
        return w_uk_HUC.contiguous(), w_uv_HOC.transpose(1, 2).contiguous()

    def _attend_absorb(self, q_nope_BSHU, q_pe_BSHR, kv_BTC, pe_BTGR, bias_BS1T) -> torch.Tensor:
        """Attention in latent space: W_UK folded into the query, W_UV applied after the weighted sum.

        Batched matrix products on cached weight layouts (an inference path: no autograd through them). Per head
        h the score of key t is q_nope·W_UK[h]·latent_t + q_pe·pe_t(group of h); the output is W_UV[h] applied to
        the probability-weighted latents.
        """
        B, S, H, R = q_pe_BSHR.shape
        G, T = self.n_rope_heads, kv_BTC.shape[1]
        w_uk_HUC, w_uv_HCO = self.absorbed.get(self.wkv_b.weight, self._split_wkv_b)
        q_lat_HNC = torch.bmm(q_nope_BSHU.reshape(B * S, H, self.nope).transpose(0, 1), w_uk_HUC)  # N = B·S
        q_lat_BSHC = q_lat_HNC.transpose(0, 1).reshape(B, S * H, self.kv_rank)
        scores_BSHT = torch.bmm(q_lat_BSHC, kv_BTC.transpose(1, 2)).view(B, S, H, T)
        # rope part: each rope key g against its H / G query heads at all S positions, as the rows of one product
        # per (row, g): queries (B·G, S·H/G, R) against keys (B·G, R, T)
        q_pe_rows = q_pe_BSHR.view(B, S, G, H // G, R).permute(0, 2, 1, 3, 4).reshape(B * G, S * (H // G), R)
        rope_rows = torch.bmm(q_pe_rows, pe_BTGR.permute(0, 2, 3, 1).reshape(B * G, R, T))
        rope_BSHT = rope_rows.view(B, G, S, H // G, T).permute(0, 2, 1, 3, 4).reshape(B, S, H, T)
        scores_BSHT = (scores_BSHT + rope_BSHT).mul_(self.scale).add_(bias_BS1T)
        probs_BSHT = scores_BSHT.softmax(dim=-1, dtype=torch.float32).to(kv_BTC.dtype)
        out_lat_BSHC = torch.bmm(probs_BSHT.view(B, S * H, T), kv_BTC)
        out_HNO = torch.bmm(out_lat_BSHC.view(B * S, H, self.kv_rank).transpose(0, 1), w_uv_HCO)
        return out_HNO.transpose(0, 1).view(B, S, H, self.v_dim)


def init_linear(module: nn.Module, std: float = 0.02) -> None:
    """GPT-style init: normal(0, std) weights for every Linear and Embedding below `module`."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)


def mha_cache_bytes_per_token(n_heads: int, head_dim: int, element_size: int = 4) -> int:
    """Bytes a standard multi-head attention layer caches per token: full K and V for every head."""
    return 2 * n_heads * head_dim * element_size
