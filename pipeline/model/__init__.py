"""The MoE student in plain PyTorch, no Ray and nothing of the application's config: config.py (its own typed config
and named sizes), mla.py (attention + latent KV cache), moe.py (DeepSeekMoE + balancing), transformer.py (the model,
FLOPs, save/load), generate.py (batched decoding), loss.py (the fused output head + cross-entropy),
reused_tensors.py (per-thread buffers for large temporaries, weights kept in a second layout), precision.py (the
dtype a student answers in), decode_timing.py (prefill and decode speed beside the teacher), hf_compat.py
(transformers' DeepseekV3 config and weights), convert/ (a teacher's weights rebuilt as the student, and the
recovery training after).

The names below load lazily (PEP 562): `import pipeline.model.config` — what the config loader does — does not
pull in torch. The decoding function is imported from its module (`pipeline.model.generate.generate`): a
package attribute of that name would be shadowed by the submodule once it is imported.

Shapes. Hot tensor code names a tensor's dims in a suffix, one capital letter per dim (`x_BSD`, `ids_NK`), and a
letter means the same thing in every module of this package:

    B  batch rows: sequences, or the cache slots they occupy
    S  positions of the tokens a call processes (the queries)
    T  positions attended over (the keys and values, cached tokens included)
    N  tokens as rows: a batch's positions flattened (B·S), or a calibration sample of them
    L  layers
    D  model dim
    V  vocabulary
    H  query heads
    G  key heads, each serving H / G query heads: a GQA teacher's KV heads; the student's rope keys
       (`n_rope_heads`: the teacher's KV heads, or 1 shared by all heads)
    C  the KV latent (`kv_lora_rank`)
    U  a query/key head's unrotated channels (`qk_nope_head_dim`)
    R  a query/key head's rotary channels (`qk_rope_head_dim`)
    Q  a query/key head's width: U + R
    O  a value head's width (`v_head_dim`), what each head outputs
    P  a rotary head's channel pairs, one frequency each: R = 2P in the student, head_dim / 2 in a teacher head
    F  FFN neurons: the teacher's FFN width, or one expert's (`moe_inter_dim`)
    E  routed experts
    K  experts chosen per token (top-k)
    A  token-expert assignments: every token's K choices, N·K rows
    M  expert groups (`n_group`) of group-limited routing
    X, Y  a generic helper's input and output width (whatever its caller passes: D or F)

A lowercase letter is a part of its capital's dim: a chunk of rows (`h_nD`), the pairs a head keeps (`pairs_Gp`),
the experts of one group (`choice_NMe`), the rows that sample (`scaled_bV`). Digits are literal: `1` a dim of
size one, `2F` two F-wide halves side by side. A tensor with a dim that no letter names (a concatenation such as
the latent beside the rope keys) carries no suffix; its shape is written where it is made.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and editors
    from pipeline.model.config import MODEL_PRESETS, ModelConfig, model_preset
    from pipeline.model.generate import Completion, SamplingParams
    from pipeline.model.moe import load_imbalance, update_router_biases
    from pipeline.model.transformer import Output, Transformer

_EXPORTS = {
    "MODEL_PRESETS": "pipeline.model.config",
    "ModelConfig": "pipeline.model.config",
    "model_preset": "pipeline.model.config",
    "Completion": "pipeline.model.generate",
    "SamplingParams": "pipeline.model.generate",
    "load_imbalance": "pipeline.model.moe",
    "update_router_biases": "pipeline.model.moe",
    "Output": "pipeline.model.transformer",
    "Transformer": "pipeline.model.transformer",
}
__all__ = [
    "MODEL_PRESETS",
    "Completion",
    "ModelConfig",
    "Output",
    "SamplingParams",
    "Transformer",
    "load_imbalance",
    "model_preset",
    "update_router_biases",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.model' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
