"""The student's own config: its architecture as one typed, validated section, and the named sizes.

Imports nothing from the application (`pipeline/config.py` imports this, never the other way) and no torch, so
the config loader can validate and expand presets cheaply. Names follow DeepSeek-V3's `ModelArgs`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from pipeline.validation import Section, at_most

# the dtype a built student answers in (evaluation, serving); resolved per device by `pipeline.model.precision`
InferenceDtype = Literal["auto", "float32", "bfloat16"]


class ModelConfig(Section):
    """The DeepSeek-V3-style MoE student; names follow DeepSeek-V3's `ModelArgs`.

    Fields are ordered so that every cross-field check only looks at fields declared above it.
    """

    # teacher: built from the teacher's weights by `pipeline.model.convert` (dim, heads, head widths, FFN width,
    # vocabulary, rope and norm settings are then the teacher's; the compression knobs below are yours: n_layers,
    # kv_lora_rank, qk_rope_head_dim, moe_inter_dim and the expert counts). scratch: random weights.
    init: Literal["teacher", "scratch"] = "teacher"
    vocab_size: int | None = Field(None, ge=1)  # None: taken from the tokenizer the student is paired with
    dim: int = Field(256, ge=1)
    n_layers: int = Field(30, ge=1)
    n_dense_layers: int = Field(1, ge=0)
    n_heads: int = Field(4, ge=1)
    # Multi-head Latent Attention
    q_lora_rank: int = Field(0, ge=0)  # 0: full-rank query projection
    kv_lora_rank: int = Field(192, ge=1)
    qk_nope_head_dim: int = Field(32, ge=0)  # 0: every query/key channel is rotary (a lossless conversion)
    qk_rope_head_dim: int = Field(32, ge=2)
    n_rope_heads: int = Field(1, ge=1)  # rope keys cached per token: 1 (DeepSeek) or the GQA teacher's KV heads
    v_head_dim: int = Field(32, ge=1)
    kv_norm: bool = True  # RMSNorm on the KV latent (DeepSeek); off in a converted student
    qkv_bias: bool = False  # biases on the query and KV down-projections (a Qwen2 teacher has them)
    norm_eps: float = Field(1e-6, gt=0)
    # Feed-forward: dense SwiGLU in the first blocks, DeepSeekMoE after
    inter_dim: int = Field(768, ge=1)
    moe_inter_dim: int = Field(64, ge=1)
    n_routed_experts: int = Field(20, ge=1)
    n_shared_experts: int = Field(4, ge=0)
    n_activated_experts: int = Field(12, ge=1)  # top-k
    n_group: int = Field(1, ge=1)
    topk_group: int = Field(1, ge=1)
    route_scale: float = Field(1.0, gt=0)
    # normalized: chosen experts weigh their normalised affinity x route_scale (DeepSeek-V3). unit: each chosen
    # expert weighs exactly 1 in the forward pass, so the routed experts sum like the dense FFN they were carved
    # from (CMoE); the router still learns through a straight-through affinity gradient.
    route_weight: Literal["normalized", "unit"] = "normalized"
    bias_update_speed: float = Field(1e-3, ge=0)
    seq_aux_alpha: float = Field(1e-4, ge=0)
    mtp_depth: int = Field(0, ge=0, le=1)
    mtp_lambda: float = Field(0.3, ge=0)
    max_seq_len: int = Field(512, ge=1)
    rope_theta: float = Field(10000.0, gt=0)
    attn_impl: Literal["naive", "absorb"] = "absorb"
    moe_impl: Literal["batched", "loop"] = "batched"

    @field_validator("n_dense_layers")
    @classmethod
    def _dense_within_layers(cls, v: int, info: ValidationInfo) -> int:
        return at_most("n_dense_layers", "n_layers", v, info)

    @field_validator("qk_rope_head_dim")
    @classmethod
    def _rope_even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"qk_rope_head_dim ({v}) must be even: RoPE rotates pairs of channels")
        return v

    @field_validator("n_rope_heads")
    @classmethod
    def _rope_heads_divide_heads(cls, v: int, info: ValidationInfo) -> int:
        h = info.data.get("n_heads")
        if h is not None and h % v:
            raise ValueError(f"n_rope_heads ({v}) must divide n_heads ({h}): each rope key serves a group of heads")
        return v

    @field_validator("n_activated_experts")
    @classmethod
    def _topk_within_experts(cls, v: int, info: ValidationInfo) -> int:
        return at_most("n_activated_experts", "n_routed_experts", v, info)

    @field_validator("n_group")
    @classmethod
    def _groups_divide_experts(cls, v: int, info: ValidationInfo) -> int:
        n = info.data.get("n_routed_experts")
        if n is not None and n % v:
            raise ValueError(f"n_group ({v}) must divide n_routed_experts ({n})")
        return v

    @field_validator("topk_group")
    @classmethod
    def _topk_group_fits(cls, v: int, info: ValidationInfo) -> int:
        at_most("topk_group", "n_group", v, info)
        n, g, k = (info.data.get(f) for f in ("n_routed_experts", "n_group", "n_activated_experts"))
        if n is not None and g is not None and k is not None and v * (n // g) < k:
            raise ValueError(f"topk_group ({v}) groups of {n // g} experts hold fewer than n_activated_experts ({k})")
        return v


# Named student sizes. A config selects one with `model: {preset: NAME}` (explicit keys beside it win). `tiny` is
# the embedded default (`ModelConfig()`): SmolLM2-135M-Instruct converted with every layer, 16 of 32 rope pairs per
# KV head, the latent at full rank, and 4 shared + 12 of 20 routed experts of 64 neurons (see docs/benchmarks.md
# for what each knob costs). `toy` is a small student from scratch, for tests and quick benchmarks. Vocabulary
# size always comes from the paired tokenizer.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # 28.9M total / 27.1M active with a 49,152-token vocabulary (num_params(); embedding and head dominate)
    "toy": dict(
        init="scratch",
        n_layers=4,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        moe_inter_dim=128,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
    ),
    # one GPU, and a cluster: SmolLM2-135M-Instruct at the cost targets (24 layers, 4 rope pairs per KV head, a
    # 72-wide latent, 4 shared + 8 of 20 routed experts: <= 50% of the teacher's active parameters, <= 25% of its KV
    # cache), which needs more recovery training than a CPU gives
    "small": dict(n_layers=24, qk_rope_head_dim=8, kv_lora_rank=72, n_activated_experts=8, max_seq_len=1024),
    "base": dict(n_layers=24, qk_rope_head_dim=8, kv_lora_rank=72, n_activated_experts=8, max_seq_len=2048),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """A validated `ModelConfig` of a named size, with overrides."""
    return ModelConfig.model_validate({**MODEL_PRESETS[name], **overrides})
