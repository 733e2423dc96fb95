"""What a teacher looks like and what its student will: the teacher's shape read from its transformers config, and
the student's config under the compression knobs (the knobs that do not fit the teacher are named)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.model.config import ModelConfig

SUPPORTED = ("llama", "qwen2")
# exact: one rope key per KV head at the teacher's own frequencies, no latent norm, unit expert weights, the
# teacher's biases: lossless at full rank, but no engine outside moeforge runs it. standard: DeepSeek-V3's layout
# (one shared rope key at standard frequencies, the latent RMSNorm, normalised top-k weights x route_scale, no
# biases), which transformers, vLLM, SGLang and llama.cpp load; lossy before training (see attention.py).
Layout = Literal["exact", "standard"]
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
    "route_scale",
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


def student_config(teacher: TeacherShape, cfg: ModelConfig, layout: Layout = "exact") -> ModelConfig:
    """The student of `teacher` under `cfg`'s compression knobs (the teacher decides every other field).

    `layout` (see `Layout`): in the standard layout the kept rope pairs are the teacher's leading ones, which are
    exactly the standard frequencies of `qk_rope_head_dim` at rope_theta' = rope_theta^(qk_rope_head_dim /
    head_dim); every query/key channel also appears in the non-rotary part (the rope keys' residual after the
    shared one is taken out, see `convert_attention_standard`), so `qk_nope_head_dim` is the teacher's head_dim.

    Raises `ConversionError` naming the knob that does not fit the teacher.
    """
    hd = teacher.head_dim
    if cfg.qk_rope_head_dim > hd:
        raise ConversionError(f"model.qk_rope_head_dim ({cfg.qk_rope_head_dim}) exceeds the teacher's head_dim ({hd})")
    nope = hd if layout == "standard" else hd - cfg.qk_rope_head_dim
    # standard: one more latent channel, the norm anchor (attention.py)
    full_rank = teacher.n_kv_heads * (nope + hd) + (layout == "standard")
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
    standard = layout == "standard"
    return ModelConfig.model_validate(
        {
            **cfg.model_dump(),
            "init": "teacher",
            "dim": teacher.dim,
            "n_heads": teacher.n_heads,
            "n_rope_heads": 1 if standard else teacher.n_kv_heads,
            "qk_nope_head_dim": nope,
            "v_head_dim": hd,
            "inter_dim": teacher.inter_dim,
            "vocab_size": teacher.vocab_size,
            # the leading pairs' frequencies theta^(-2i/hd) are theta'^(-2i/R) for theta' = theta^(R/hd)
            "rope_theta": teacher.rope_theta ** (cfg.qk_rope_head_dim / hd) if standard else teacher.rope_theta,
            "norm_eps": teacher.norm_eps,
            "kv_norm": standard,
            "qkv_bias": teacher.qkv_bias and not standard,
            "q_lora_rank": 0,
            "route_weight": "normalized" if standard else "unit",
            # normalised weights x k: every chosen expert weighs 1 when their affinities are equal (see ffn.py)
            "route_scale": float(cfg.n_activated_experts) if standard else 1.0,
            "max_seq_len": min(cfg.max_seq_len, teacher.max_seq_len),
        }
    )
