"""Bridges to transformers' DeepseekV3 implementation: config mapping and weight copies.

Used by the parity tests and the benchmarks, which run the same function in both implementations on identical
weights. Our layouts match transformers' for the router and routed experts; the shared and dense MLPs keep gate
and up fused in `w13`, which splits in two.
"""

from __future__ import annotations

import torch

from pipeline.model.config import ModelConfig
from pipeline.model.moe import MLP, MoE


def to_hf_config(cfg: ModelConfig):
    """A `transformers.DeepseekV3Config` describing the same architecture (no MTP; eager experts)."""
    from transformers import DeepseekV3Config

    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is not set")
    unsupported = {
        "n_rope_heads": cfg.n_rope_heads != 1,
        "kv_norm": not cfg.kv_norm,
        "qkv_bias": cfg.qkv_bias,
        "route_weight": cfg.route_weight != "normalized",
    }
    if bad := [k for k, v in unsupported.items() if v]:
        raise ValueError(f"transformers' DeepseekV3 has no equivalent of model.{', model.'.join(bad)} as set here")
    return DeepseekV3Config(  # type: ignore[call-arg]  # rope and MTP settings pass through **kwargs
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.inter_dim,
        moe_intermediate_size=cfg.moe_inter_dim,
        num_hidden_layers=cfg.n_layers,
        first_k_dense_replace=cfg.n_dense_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        n_shared_experts=cfg.n_shared_experts,
        n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.n_activated_experts,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        routed_scaling_factor=cfg.route_scale,
        norm_topk_prob=True,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank or None,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        rope_interleave=True,
        tie_word_embeddings=False,
        attention_bias=False,
        num_nextn_predict_layers=0,
        hidden_act="silu",
    )


def hf_moe(cfg: ModelConfig):
    """transformers' `DeepseekV3MoE` for this config (random weights; see `copy_moe_to_hf`)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    return DeepseekV3MoE(to_hf_config(cfg.model_copy(update={"vocab_size": cfg.vocab_size or 1})))


@torch.no_grad()
def _copy_mlp(ours: MLP, hf) -> None:
    gate, up = ours.w13.weight.chunk(2, dim=0)
    hf.gate_proj.weight.copy_(gate)
    hf.up_proj.weight.copy_(up)
    hf.down_proj.weight.copy_(ours.w2.weight)


@torch.no_grad()
def copy_moe_to_hf(ours: MoE, hf) -> None:
    """Our MoE layer's weights (router, its correction bias, experts, shared experts) into a `DeepseekV3MoE`."""
    hf.gate.weight.copy_(ours.gate.weight)
    hf.gate.e_score_correction_bias.copy_(ours.gate.bias)
    hf.experts.gate_up_proj.copy_(ours.experts.w13)
    hf.experts.down_proj.copy_(ours.experts.w2)
    if ours.shared is not None:
        _copy_mlp(ours.shared, hf.shared_experts)


@torch.no_grad()
def copy_model_to_hf(ours, hf) -> None:
    """A whole `Transformer` into `DeepseekV3ForCausalLM` (built from `to_hf_config(ours.cfg)`).

    Attention projections have the same layouts (query heads split [nope | rope], the KV down-projection
    [latent | rope key], the up-projection per head [nope key | value]), and both rotate interleaved pairs.
    """
    hf.model.embed_tokens.weight.copy_(ours.embed.weight)
    hf.model.norm.weight.copy_(ours.norm.weight)
    hf.lm_head.weight.copy_(ours.head.weight)
    for block, layer in zip(ours.layers, hf.model.layers, strict=True):
        layer.input_layernorm.weight.copy_(block.attn_norm.weight)
        layer.post_attention_layernorm.weight.copy_(block.ffn_norm.weight)
        a, h = block.attn, layer.self_attn
        if hasattr(a, "wq"):
            h.q_proj.weight.copy_(a.wq.weight)
        else:
            h.q_a_proj.weight.copy_(a.wq_a.weight)
            h.q_a_layernorm.weight.copy_(a.q_norm.weight)
            h.q_b_proj.weight.copy_(a.wq_b.weight)
        h.kv_a_proj_with_mqa.weight.copy_(a.wkv_a.weight)
        h.kv_a_layernorm.weight.copy_(a.kv_norm.weight)
        h.kv_b_proj.weight.copy_(a.wkv_b.weight)
        h.o_proj.weight.copy_(a.wo.weight)
        if isinstance(block.ffn, MoE):
            copy_moe_to_hf(block.ffn, layer.mlp)
        else:
            _copy_mlp(block.ffn, layer.mlp)
