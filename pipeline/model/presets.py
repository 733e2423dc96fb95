"""Named student sizes. A config selects one with `model: {preset: NAME}` (explicit keys beside it win).

Plain data, no torch import, so the config loader can expand presets cheaply. `tiny` is the embedded default
(`ModelConfig()`); the others are for GPUs. Vocabulary size always comes from the paired tokenizer.
"""

from __future__ import annotations

from typing import Any

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # 28.9M total / 27.1M active with a 49,152-token vocabulary (num_params(); embedding and head dominate).
    "tiny": {},
    # one GPU
    "small": dict(dim=512, n_layers=8, n_dense_layers=1, n_heads=8, q_lora_rank=192, kv_lora_rank=128,
                  qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, inter_dim=1536, moe_inter_dim=256,
                  n_routed_experts=32, n_shared_experts=1, n_activated_experts=4, n_group=4, topk_group=2,
                  route_scale=2.5, max_seq_len=1024),
    # a multi-GPU cluster
    "base": dict(dim=768, n_layers=12, n_dense_layers=1, n_heads=12, q_lora_rank=384, kv_lora_rank=256,
                 qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, inter_dim=2048, moe_inter_dim=384,
                 n_routed_experts=64, n_shared_experts=1, n_activated_experts=6, n_group=8, topk_group=4,
                 route_scale=2.5, max_seq_len=2048),
}


def model_preset(name: str, **overrides: Any):
    """A validated `ModelConfig` of a named size, with overrides."""
    from pipeline.config import ModelConfig

    return ModelConfig.model_validate({**MODEL_PRESETS[name], **overrides})
