"""The MoE student in plain PyTorch: mla.py (attention + latent KV cache), moe.py (DeepSeekMoE + balancing),
transformer.py (the model, sizes, save/load), generate.py (batched decoding). No Ray in here."""

from pipeline.model.generate import Completion, SamplingParams, generate
from pipeline.model.moe import load_imbalance, update_router_biases
from pipeline.model.presets import MODEL_PRESETS, model_preset
from pipeline.model.transformer import Output, Transformer

__all__ = ["MODEL_PRESETS", "Completion", "Output", "SamplingParams", "Transformer", "generate", "load_imbalance",
           "model_preset", "update_router_biases"]
