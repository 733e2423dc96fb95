"""The whole model: the teacher's layers chosen (depth pruning), then each one's attention and FFN mapped.

`choose_layers` keeps the layers named, else the most important ones by Minitron's block importance; `convert`
copies the embedding, head and norms and maps every kept layer (`convert_attention`, `convert_ffn`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.model.config import ModelConfig
from pipeline.model.convert.attention import convert_attention, convert_attention_standard, rope_pairs
from pipeline.model.convert.calibration import Calibration
from pipeline.model.convert.ffn import convert_ffn
from pipeline.model.convert.shapes import ConversionError, Layout, TeacherShape, student_config
from pipeline.model.mla import MLA, rope_frequencies
from pipeline.model.moe import MLP, MoE
from pipeline.model.transformer import Block, Transformer


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


@dataclass
class ConversionChoices:
    """What `convert` chose and found, per student layer (the stage stores it, with its measurements, as the typed
    `ConversionReport` of conversion.json)."""

    layers: list[int]  # teacher layer of each student layer
    rope_pairs: list[list[list[int]]]  # per student layer, per KV head: the kept channel pairs
    importance: list[float]  # every teacher layer's BI
    teacher_params: dict[str, int]
    calibration_tokens: int
    layout: Layout = "exact"
    # standard layout, per student layer: the share of the kept frequencies' key energy its shared rope key holds
    rope_key_energy: list[float] | None = None
    # standard layout, per student layer: the latent's norm anchor, as its RMS over the rest's (0: none)
    latent_anchor: list[float] | None = None
    # standard layout, per student layer: the latent norm's fitted weight's RMS, held by the up-projection instead
    latent_scale: list[float] | None = None


@torch.no_grad()
def convert(
    teacher,
    cfg: ModelConfig,
    calibration: Calibration | None = None,
    keep_layers: Sequence[int] | None = None,
    seed: int = 0,
    layout: Layout = "exact",
    router_logit_std: float = 0.1,
    latent_anchor: bool = True,
):
    """The student of `teacher` (a transformers Llama/Qwen2 causal LM) under `cfg`'s compression knobs, in
    `layout` (see `shapes.Layout`).

    Without `calibration` every mapping falls back to weights alone (identity input moment, pairs by index,
    layers from the front, neurons in order, an unfitted router): enough for lossless settings, poor for lossy
    ones. `router_logit_std`: the standard layout's router scale at conversion (see ffn.py); `latent_anchor`:
    whether its latent may have a norm anchor (attention.py; off only to measure what it buys). Returns (student,
    report).
    """
    shape = TeacherShape.of(teacher.config)
    scfg = student_config(shape, cfg, layout)
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
    standard = layout == "standard"
    if standard and not torch.allclose(
        rope_frequencies(scfg.qk_rope_head_dim, scfg.rope_theta), inv_freq_P[:n_pairs], rtol=1e-5, atol=0
    ):  # llama3/linear-scaled teachers: their leading frequencies are not a standard table
        raise ConversionError("the teacher's RoPE frequencies are not standard; convert.layout: exact keeps them")
    hf = teacher.model
    model.embed.weight.copy_(hf.embed_tokens.weight)
    model.head.weight.copy_(teacher.lm_head.weight)
    model.norm.weight.copy_(hf.norm.weight)
    kept_pairs, energy, anchors, scales = [], [], [], []
    for j, i in enumerate(chosen):
        layer, block = hf.layers[i], model.layers[j]
        assert isinstance(block, Block)
        stats = calibration.layers[i] if calibration else None
        block.attn_norm.weight.copy_(layer.input_layernorm.weight)
        block.ffn_norm.weight.copy_(layer.post_attention_layernorm.weight)
        if standard:  # the leading pairs: the standard frequencies (see student_config)
            pairs_Gp = torch.arange(n_pairs).expand(shape.n_kv_heads, -1)
        elif stats is not None:
            pairs_Gp = rope_pairs(stats.pair_norm_GP, n_pairs)
        else:
            pairs_Gp = torch.arange(n_pairs).expand(shape.n_kv_heads, -1)
        kept_pairs.append(pairs_Gp.tolist())
        assert isinstance(block.attn, MLA)
        moment_DD = stats.attn_moment_DD if stats is not None else None
        if standard:
            mean_D, sample_ND = (stats.attn_mean_D, stats.attn_in_ND) if stats is not None else (None, None)
            mean_D = mean_D if latent_anchor else None
            share, anchor, scale = convert_attention_standard(
                layer.self_attn, block.attn, shape, moment_DD, mean_D, sample_ND
            )
            energy.append(share)
            anchors.append(anchor)
            scales.append(scale)
        else:
            convert_attention(layer.self_attn, block.attn, shape, pairs_Gp, inv_freq_P, moment_DD)
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
                logit_std=router_logit_std if standard else 1.0,
            )
    return model, ConversionChoices(
        chosen,
        kept_pairs,
        importance,
        shape.num_params(),
        calibration.tokens if calibration else 0,
        layout,
        energy if standard else None,
        anchors if standard else None,
        scales if standard else None,
    )
