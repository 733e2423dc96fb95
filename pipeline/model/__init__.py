"""The MoE student in plain PyTorch, no Ray and nothing of the application's config: config.py (its own typed
config and named sizes), mla.py (attention + latent KV cache), moe.py (DeepSeekMoE + balancing), transformer.py
(the model, FLOPs, save/load), generate.py (batched decoding), loss.py (the fused output head + cross-entropy).

The names below load lazily (PEP 562): `import pipeline.model.config` — what the config loader does — does not
pull in torch. The decoding function is imported from its module (`pipeline.model.generate.generate`): a
package attribute of that name would be shadowed by the submodule once it is imported.
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
