"""Teacher → student: a Llama-family transformers model rebuilt as the DeepSeek-V3-style MoE student.

The one pretrained model on a laptop is the teacher, so the student starts as a cheaper copy of it (then
distillation recovers what the compression lost). Plain torch, no Ray. Leaves first:

- calibration (`calibrate`): run the teacher over teacher-written token sequences and keep, per layer, what the
  mappings need: the attention input's second moment, each query/key channel pair's norm, FFN activations of a
  token sample, and each block's importance (Minitron's BI: 1 - cos(block input, block output)).
- attention → MLA (`convert_attention`): partial RoPE keeps, per KV head, the channel pairs with the most q·k norm
  (MHA2MLA's 2-norm criterion); the rest of the key and the whole value are compressed jointly into the latent by
  an activation-aware SVD (MHA2MLA's joint SVD, whitened by the calibration inputs so the error is measured on
  real activations). Each KV head keeps its own rope key (`n_rope_heads`): DeepSeek's one shared rope key cannot
  hold a GQA teacher's three differently-rotated keys without loss, and this way the conversion is exact at full
  rank.
- dense FFN → DeepSeekMoE (`convert_ffn`): the most-activated neurons form the shared expert; the rest are split
  into equal routed experts by balanced k-means on their co-activation (CMoE, LLaMA-MoE v2), and the router is
  fitted to predict each expert's activation mass. Chosen experts weigh 1 (`route_weight: unit`), so with every
  expert active the layer is the dense FFN.
- depth pruning (`choose_layers`): keep the layers named, else the most important ones by BI.

`convert` puts these together; `student_config` says what the student looks like for a given teacher. Shape
suffixes: T tokens, D model dim, H query heads, G KV heads, P channel pairs per head, F FFN neurons, E experts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.mla import MLA
from pipeline.model.moe import MLP, MoE

SUPPORTED = ("llama", "qwen2")
# the fields a converted student takes from the teacher; the others are the compression knobs
TEACHER_FIELDS = (
    "dim",
    "n_heads",
    "n_rope_heads",
    "qk_nope_head_dim",
    "v_head_dim",
    "inter_dim",
    "vocab_size",
    "rope_theta",
    "norm_eps",
    "kv_norm",
    "qkv_bias",
    "q_lora_rank",
    "route_weight",
)


class ConversionError(ValueError):
    """The teacher cannot be converted, or the requested student does not fit it; the message says which."""


@dataclass(frozen=True)
class TeacherShape:
    """What the converter needs of a transformers Llama-family config."""

    model_type: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    inter_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    max_seq_len: int

    @classmethod
    def of(cls, hf_config) -> TeacherShape:
        kind = hf_config.model_type
        if kind not in SUPPORTED:
            raise ConversionError(f"teacher model_type {kind!r} is not convertible; supported: {', '.join(SUPPORTED)}")
        if getattr(hf_config, "hidden_act", "silu") != "silu" or getattr(hf_config, "mlp_bias", False):
            raise ConversionError("the teacher's FFN is not a bias-free SwiGLU (hidden_act silu, mlp_bias false)")
        if getattr(hf_config, "use_sliding_window", False):
            raise ConversionError("the teacher uses sliding-window attention, which the student does not have")
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") not in ("default", "llama3", "linear"):
            raise ConversionError(
                f"the teacher's rope_type {rope.get('rope_type')!r} rescales attention; "
                "only default, linear and llama3 RoPE convert exactly"
            )
        heads = hf_config.num_attention_heads
        return cls(
            kind,
            hf_config.hidden_size,
            hf_config.num_hidden_layers,
            heads,
            getattr(hf_config, "num_key_value_heads", None) or heads,
            getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            hf_config.intermediate_size,
            hf_config.vocab_size,
            float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
            float(hf_config.rms_norm_eps),
            bool(getattr(hf_config, "attention_bias", kind == "qwen2")),
            int(hf_config.max_position_embeddings),
        )

    @property
    def kv_width(self) -> int:
        """Per token, the floats a GQA layer caches: K and V of every KV head."""
        return 2 * self.n_kv_heads * self.head_dim

    def num_params(self) -> dict[str, int]:
        """Total and embedding parameters (input embedding + output head, once if tied)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 3 * self.dim * self.inter_dim + 2 * self.dim
        embedding = self.vocab_size * self.dim
        return {"total": embedding + self.n_layers * per_layer + self.dim, "embedding": embedding}


def student_config(teacher: TeacherShape, cfg: ModelConfig, shared_rope_key: bool = False) -> ModelConfig:
    """The student of `teacher` under `cfg`'s compression knobs (the teacher decides every other field).

    `shared_rope_key`: DeepSeek's one rope key for all heads instead of one per KV head (lossy even uncompressed;
    kept to measure what the per-head keys buy).

    Raises `ConversionError` naming the knob that does not fit the teacher.
    """
    hd = teacher.head_dim
    if cfg.qk_rope_head_dim > hd:
        raise ConversionError(f"model.qk_rope_head_dim ({cfg.qk_rope_head_dim}) exceeds the teacher's head_dim ({hd})")
    nope = hd - cfg.qk_rope_head_dim
    full_rank = teacher.n_kv_heads * (nope + hd)
    if cfg.kv_lora_rank > full_rank:
        raise ConversionError(
            f"model.kv_lora_rank ({cfg.kv_lora_rank}) exceeds the full rank of the teacher's "
            f"non-rope keys and values ({full_rank})"
        )
    if cfg.n_layers > teacher.n_layers:
        raise ConversionError(f"model.n_layers ({cfg.n_layers}) exceeds the teacher's {teacher.n_layers} layers")
    moe_width = (cfg.n_shared_experts + cfg.n_routed_experts) * cfg.moe_inter_dim
    if cfg.n_layers > cfg.n_dense_layers and moe_width > teacher.inter_dim:
        raise ConversionError(
            f"(n_shared_experts + n_routed_experts) x moe_inter_dim = {moe_width} exceeds the teacher's FFN width "
            f"({teacher.inter_dim}): experts are carved from its neurons"
        )
    return ModelConfig.model_validate(
        {
            **cfg.model_dump(),
            "init": "teacher",
            "dim": teacher.dim,
            "n_heads": teacher.n_heads,
            "n_rope_heads": 1 if shared_rope_key else teacher.n_kv_heads,
            "qk_nope_head_dim": nope,
            "v_head_dim": hd,
            "inter_dim": teacher.inter_dim,
            "vocab_size": teacher.vocab_size,
            "rope_theta": teacher.rope_theta,
            "norm_eps": teacher.norm_eps,
            "kv_norm": False,
            "qkv_bias": teacher.qkv_bias,
            "q_lora_rank": 0,
            "route_weight": "unit",
            "max_seq_len": min(cfg.max_seq_len, teacher.max_seq_len),
        }
    )


# ---------------------------------------------------------------------------------------------------- calibration


@dataclass
class LayerStats:
    """One teacher layer's calibration statistics."""

    attn_moment_DD: torch.Tensor  # sum over tokens of x x^T, x the attention input (after its norm)
    pair_norm_GP: torch.Tensor  # per KV head and channel pair: sum over its query heads of E|q_pair| * E|k_pair|
    ffn_in_TD: torch.Tensor  # a sample of FFN inputs (after its norm) ...
    ffn_act_TF: torch.Tensor  # ... and the neurons' activations silu(gate) * up on them
    ffn_mass_F: torch.Tensor  # mean |activation| of each neuron over all calibration tokens
    importance: float  # Minitron's block importance: mean 1 - cos(block input, block output)


def pad_batch(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences right-padded with id 0 to the longest: ids (B, S) and the mask of real tokens (B, S)."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([list(s) + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], dtype=torch.bool)
    return ids, mask


@dataclass
class Calibration:
    layers: list[LayerStats]
    tokens: int
    sequences: int


@torch.no_grad()
def calibrate(
    teacher, sequences: Sequence[Sequence[int]], ffn_sample: int = 1024, batch_size: int = 8, seed: int = 0
) -> Calibration:
    """Run the teacher over `sequences` (token ids) and collect each layer's statistics.

    `ffn_sample` tokens per layer (spread over all sequences, seeded) keep their FFN inputs and activations for
    clustering and the router fit; every token counts towards the moments, norms and importances.
    """
    if not sequences:
        raise ConversionError("calibration needs at least one token sequence")
    shape = TeacherShape.of(teacher.config)
    H, G, hd = shape.n_heads, shape.n_kv_heads, shape.head_dim
    P = hd // 2
    n_layers = shape.n_layers
    total = sum(len(s) for s in sequences)
    gen = torch.Generator().manual_seed(seed)
    keep_T = torch.zeros(total, dtype=torch.bool)
    keep_T[torch.randperm(total, generator=gen)[:ffn_sample]] = True
    moment = [torch.zeros(shape.dim, shape.dim, dtype=torch.float64) for _ in range(n_layers)]
    q_norm = [torch.zeros(H, P, dtype=torch.float64) for _ in range(n_layers)]
    k_norm = [torch.zeros(G, P, dtype=torch.float64) for _ in range(n_layers)]
    ffn_in: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    ffn_act: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    mass = [torch.zeros(shape.inter_dim, dtype=torch.float64) for _ in range(n_layers)]
    importance = [0.0] * n_layers
    state: dict[str, torch.Tensor] = {}

    def pair_norms(y_TX: torch.Tensor, heads: int) -> torch.Tensor:
        y = y_TX.view(-1, heads, 2, P)  # rotate_half layout: pair i is channels (i, i + P)
        return y.norm(dim=2).double().sum(0)

    def on_attn(i: int):
        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"])[state["mask"]]  # (T, D), padding dropped
            moment[i].add_(x.T.double() @ x.double())
            q_norm[i].add_(pair_norms(module.q_proj(x), H))
            k_norm[i].add_(pair_norms(module.k_proj(x), G))

        return hook

    def on_mlp(i: int):
        def hook(module, args):
            x = args[0][state["mask"]]
            act = nn.functional.silu(module.gate_proj(x)) * module.up_proj(x)
            mass[i].add_(act.abs().double().sum(0))
            keep = state["keep"]
            ffn_in[i].append(x[keep])
            ffn_act[i].append(act[keep])

        return hook

    def on_block(i: int):
        def hook(module, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"])[state["mask"]].double()
            y = (output[0] if isinstance(output, tuple) else output)[state["mask"]].double()
            importance[i] += float((1 - nn.functional.cosine_similarity(x, y, dim=-1)).sum())

        return hook

    layers = teacher.model.layers
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.register_forward_pre_hook(on_attn(i), with_kwargs=True))
        handles.append(layer.mlp.register_forward_pre_hook(on_mlp(i)))
        handles.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
    was_training = teacher.training
    teacher.eval()
    offset = 0
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = pad_batch(sequences[start : start + batch_size])
            n = int(mask.sum())
            state["mask"], state["keep"] = mask, keep_T[offset : offset + n]
            offset += n
            teacher.model(input_ids=ids, attention_mask=mask.long())
    finally:
        for h in handles:
            h.remove()
        teacher.train(was_training)
    group = H // G
    stats = []
    for i in range(n_layers):
        q = q_norm[i] / total
        k = k_norm[i] / total
        pair = (q.view(G, group, P) * k[:, None, :]).sum(1)
        stats.append(
            LayerStats(
                moment[i] / total,
                pair,
                torch.cat(ffn_in[i]),
                torch.cat(ffn_act[i]),
                mass[i] / total,
                importance[i] / total,
            )
        )
    return Calibration(stats, total, len(sequences))


# ---------------------------------------------------------------------------------------------------- mappings


def choose_layers(importance: Sequence[float], n_layers: int, keep: Sequence[int] | None = None) -> list[int]:
    """Which teacher layers the student keeps, in order: `keep` if named, else the `n_layers` most important."""
    total = len(importance)
    if keep is not None:
        keep = list(keep)
        if len(keep) != n_layers or len(set(keep)) != len(keep) or sorted(keep) != keep:
            raise ConversionError(f"keep_layers {keep} must name {n_layers} distinct teacher layers in order")
        if keep and not 0 <= keep[0] <= keep[-1] < total:
            raise ConversionError(f"keep_layers {keep} names a layer outside the teacher's 0..{total - 1}")
        return keep
    ranked = sorted(range(total), key=lambda i: -importance[i])
    return sorted(ranked[:n_layers])


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
    pairs_GP: torch.Tensor,
    inv_freq_P: torch.Tensor,
    moment_DD: torch.Tensor | None,
) -> None:
    """One GQA attention layer into `mla` (partial RoPE on `pairs_GP`, joint low-rank keys and values).

    Query/key channels of head g split into rope channels (the kept pairs, interleaved as our RoPE rotates them)
    and the rest (nope). The nope keys and the values of all KV heads are stacked and projected onto the top
    `kv_lora_rank` left singular vectors of (W_kv L), L whitening the calibration inputs: the latent is
    U^T W_kv x, its up-projection U. With every pair kept and full rank, U is orthogonal and nothing changes.
    """
    H, G, hd, D = shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.dim
    P, group = hd // 2, H // G
    n_keep = pairs_GP.shape[1]
    C = mla.kv_rank

    def layouts(g: int) -> tuple[torch.Tensor, torch.Tensor]:
        kept = pairs_GP[g]
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
        if not all(torch.equal(pairs_GP[0], p) for p in pairs_GP):
            raise ConversionError("a shared rope key needs the same rope pairs on every KV head")
        rope_W = torch.stack([wk[r] for r in k_rope_rows]).mean(0)
    else:
        rope_W = torch.cat([wk[r] for r in k_rope_rows])
    q_idx = torch.cat(q_rows)
    mla.wq.weight.copy_(wq[q_idx])
    # stacked [k_nope_g ; v_g] per KV head: the rows the latent must reproduce
    kv_rows_W = torch.cat([torch.cat([wk[k_nope_rows[g]], wv[g * hd : (g + 1) * hd]]) for g in range(G)])
    if moment_DD is None:
        moment_DD = torch.eye(D, dtype=torch.float64)
    L = _whitener(moment_DD)
    U, _, _ = torch.linalg.svd(kv_rows_W.double() @ L, full_matrices=False)
    U_C = U[:, :C]
    down = (U_C.T @ kv_rows_W.double()).to(mla.wkv_a.weight.dtype)
    mla.wkv_a.weight.copy_(torch.cat([down, rope_W]))
    up = U_C.to(mla.wkv_b.weight.dtype).view(G, -1, C)  # (G, N + hd, C)
    mla.wkv_b.weight.copy_(up.repeat_interleave(group, dim=0).reshape(-1, C))
    mla.wo.weight.copy_(hf_attn.o_proj.weight)
    if bias:
        bq, bk, bv = hf_attn.q_proj.bias, hf_attn.k_proj.bias, hf_attn.v_proj.bias
        mla.wq.bias.copy_(bq[q_idx])
        b_kv = torch.cat([torch.cat([bk[k_nope_rows[g]], bv[g * hd : (g + 1) * hd]]) for g in range(G)])
        rope_b = torch.stack([bk[r] for r in k_rope_rows])
        rope_b = rope_b.mean(0) if mla.n_rope_heads == 1 else rope_b.flatten()
        mla.wkv_a.bias.copy_(torch.cat([(U_C.T @ b_kv.double()).to(b_kv.dtype), rope_b]))
    mla.inv_freq.copy_(inv_freq_P[pairs_GP[: mla.n_rope_heads]])
    assert mla.inv_freq.shape == (mla.n_rope_heads, n_keep)


def balanced_kmeans(features_NX: torch.Tensor, n_clusters: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Cluster N rows into `n_clusters` groups of exactly N / n_clusters (greedy balanced assignment).

    Returns the cluster of each row, (N,). Rows should be normalised: distance is Euclidean.
    """
    N = features_NX.shape[0]
    if N % n_clusters:
        raise ConversionError(f"{N} neurons do not split into {n_clusters} equal experts")
    size = N // n_clusters
    gen = torch.Generator().manual_seed(seed)
    centers_EX = features_NX[torch.randperm(N, generator=gen)[:n_clusters]].clone()
    assign_N = torch.zeros(N, dtype=torch.long)
    for _ in range(iters):
        dist_NE = torch.cdist(features_NX, centers_EX)
        order = dist_NE.flatten().argsort()
        fill = [0] * n_clusters
        done = torch.zeros(N, dtype=torch.bool)
        left = N
        for flat in order.tolist():
            n, e = divmod(flat, n_clusters)
            if done[n] or fill[e] == size:
                continue
            assign_N[n], done[n] = e, True
            fill[e] += 1
            left -= 1
            if left == 0:
                break
        new = torch.stack([features_NX[assign_N == e].mean(0) for e in range(n_clusters)])
        if torch.allclose(new, centers_EX):
            break
        centers_EX = new
    return assign_N


@torch.no_grad()
def convert_ffn(hf_mlp, moe: MoE, stats: LayerStats | None, n_shared: int, expert_width: int, seed: int = 0) -> dict:
    """One dense SwiGLU FFN into shared + routed experts; returns which neurons went where.

    Shared: the `n_shared` neurons of the largest mean |activation|. Routed: the next E·width neurons (fewer
    only when the experts hold less than the FFN), in E balanced clusters of co-activation (each neuron's
    normalised |activation| over the calibration sample). Router: least squares from the FFN input to each
    expert's activation mass on the sample, standardised so its sigmoid starts unsaturated. Without `stats`:
    neurons in index order, contiguous experts, a zero router.
    """
    gate, up, down = hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight, hf_mlp.down_proj.weight
    E = moe.n_experts
    order = stats.ffn_mass_F.argsort(descending=True) if stats is not None else torch.arange(gate.shape[0])
    shared_idx = order[:n_shared].sort().values
    routed_pool = order[n_shared : n_shared + E * expert_width]
    if stats is not None:
        feats = stats.ffn_act_TF[:, routed_pool].abs().T.float()
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cluster = balanced_kmeans(feats, E, seed=seed)
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
    x_TD = stats.ffn_in_TD.double()
    mass_TE = torch.stack([stats.ffn_act_TF[:, i].abs().sum(1) for i in experts], dim=1).double()
    mass_TE = (mass_TE - mass_TE.mean(0)) / mass_TE.std(0).clamp_min(1e-12)
    ridge = 1e-3 * x_TD.pow(2).sum(0).mean()
    w_DE = torch.linalg.solve(x_TD.T @ x_TD + ridge * torch.eye(x_TD.shape[1], dtype=x_TD.dtype), x_TD.T @ mass_TE)
    logits_TE = x_TD @ w_DE
    moe.gate.weight.copy_((w_DE / logits_TE.std().clamp_min(1e-12)).T.to(moe.gate.weight.dtype))
    return {"shared": shared_idx.tolist(), "experts": [e.tolist() for e in experts]}


# ---------------------------------------------------------------------------------------------------- the whole model


@dataclass
class ConversionReport:
    layers: list[int]  # teacher layer of each student layer
    rope_pairs: list[list[list[int]]]  # per student layer, per KV head: the kept channel pairs
    importance: list[float]  # every teacher layer's BI
    teacher_params: dict[str, int]
    calibration_tokens: int


@torch.no_grad()
def convert(
    teacher,
    cfg: ModelConfig,
    calibration: Calibration | None = None,
    keep_layers: Sequence[int] | None = None,
    seed: int = 0,
    shared_rope_key: bool = False,
):
    """The student of `teacher` (a transformers Llama/Qwen2 causal LM) under `cfg`'s compression knobs.

    Without `calibration` every mapping falls back to weights alone (identity input moment, pairs by index,
    layers from the front, neurons in order, an unfitted router): enough for lossless settings, poor for lossy
    ones. Returns (student, report).
    """
    from pipeline.model.transformer import Block, Transformer

    shape = TeacherShape.of(teacher.config)
    scfg = student_config(shape, cfg, shared_rope_key)
    model = Transformer(scfg)
    model.train(False)
    n_pairs = scfg.qk_rope_head_dim // 2
    importance = (
        [s.importance for s in calibration.layers] if calibration else [float(-i) for i in range(shape.n_layers)]
    )
    chosen = choose_layers(importance, scfg.n_layers, keep_layers)
    inv_freq_P = teacher.model.rotary_emb.inv_freq.float()
    if getattr(teacher.model.rotary_emb, "attention_scaling", 1.0) != 1.0:
        raise ConversionError("the teacher's RoPE scales attention (attention_scaling != 1)")
    hf = teacher.model
    model.embed.weight.copy_(hf.embed_tokens.weight)
    model.head.weight.copy_(teacher.lm_head.weight)
    model.norm.weight.copy_(hf.norm.weight)
    kept_pairs = []
    for j, i in enumerate(chosen):
        layer, block = hf.layers[i], model.layers[j]
        assert isinstance(block, Block)
        stats = calibration.layers[i] if calibration else None
        block.attn_norm.weight.copy_(layer.input_layernorm.weight)
        block.ffn_norm.weight.copy_(layer.post_attention_layernorm.weight)
        if stats is not None and shared_rope_key:  # the same pairs for every head: the largest summed norms
            pairs_GP = rope_pairs(stats.pair_norm_GP.sum(0, keepdim=True), n_pairs).expand(shape.n_kv_heads, -1)
        elif stats is not None:
            pairs_GP = rope_pairs(stats.pair_norm_GP, n_pairs)
        else:
            pairs_GP = torch.arange(n_pairs).expand(shape.n_kv_heads, -1)
        kept_pairs.append(pairs_GP.tolist())
        assert isinstance(block.attn, MLA)
        convert_attention(
            layer.self_attn,
            block.attn,
            shape,
            pairs_GP,
            inv_freq_P,
            stats.attn_moment_DD if stats is not None else None,
        )
        if isinstance(block.ffn, MLP):  # the first n_dense_layers
            block.ffn.w13.weight.copy_(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]))
            block.ffn.w2.weight.copy_(layer.mlp.down_proj.weight)
        else:
            assert isinstance(block.ffn, MoE)
            convert_ffn(
                layer.mlp,
                block.ffn,
                stats,
                scfg.n_shared_experts * scfg.moe_inter_dim,
                scfg.moe_inter_dim,
                seed=seed + j,
            )
    return model, ConversionReport(
        chosen, kept_pairs, importance, shape.num_params(), calibration.tokens if calibration else 0
    )


# ---------------------------------------------------------------------------------------------------- fidelity


@dataclass
class Fidelity:
    kl: float  # mean next-token KL(teacher || student) in nats, over the held-out tokens
    student_ppl: float
    teacher_ppl: float
    tokens: int


@torch.no_grad()
def fidelity(teacher, student, sequences: Iterable[Sequence[int]], batch_size: int = 8) -> Fidelity:
    """How far the student's next-token distribution is from the teacher's on held-out teacher text."""
    kl_sum = s_nll = t_nll = 0.0
    n = 0
    seqs = [list(s) for s in sequences if len(s) > 1]
    if not seqs:
        raise ConversionError("fidelity needs at least one held-out sequence of two or more tokens")
    student.train(False)
    teacher.train(False)
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[start : start + batch_size])
        t_logp = teacher(input_ids=ids, attention_mask=mask.long()).logits.float().log_softmax(-1)[:, :-1]
        s_logp = student(ids).float().log_softmax(-1)[:, :-1]
        valid = mask[:, 1:]
        target = ids[:, 1:, None]
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        kl_sum += float(kl[valid].sum())
        s_nll -= float(s_logp.gather(-1, target).squeeze(-1)[valid].sum())
        t_nll -= float(t_logp.gather(-1, target).squeeze(-1)[valid].sum())
        n += int(valid.sum())
    return Fidelity(kl_sum / n, math.exp(s_nll / n), math.exp(t_nll / n), n)


# ---------------------------------------------------------------------------------------------------- economics


def economics(student_cfg: ModelConfig, student_params: dict[str, int], teacher: TeacherShape) -> dict[str, float]:
    """What the student costs beside the teacher, per token: parameters touched and KV-cache floats.

    Embedding parameters are the input embedding and the output head (counted once for a tied teacher).
    """
    t = teacher.num_params()
    c = student_cfg
    s_cache = c.n_layers * (c.kv_lora_rank + c.n_rope_heads * c.qk_rope_head_dim)
    t_cache = teacher.n_layers * teacher.kv_width
    s_active = student_params["active"] - student_params["embedding"]
    t_active = t["total"] - t["embedding"]
    return {
        "student_params_total": student_params["total"],
        "student_params_active": student_params["active"],
        "student_params_active_nonembedding": s_active,
        "student_params_embedding": student_params["embedding"],
        "teacher_params_total": t["total"],
        "teacher_params_nonembedding": t_active,
        "teacher_params_embedding": t["embedding"],
        "active_param_ratio": s_active / t_active,
        "student_cache_floats_per_token": s_cache,
        "teacher_cache_floats_per_token": t_cache,
        "cache_ratio": s_cache / t_cache,
    }
