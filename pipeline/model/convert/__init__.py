"""Teacher → student: a Llama-family transformers model rebuilt as the DeepSeek-V3-style MoE student.

The one pretrained model on a laptop is the teacher, so the student starts as a cheaper copy of it (then
distillation recovers what the compression lost). Plain torch, no Ray. Leaves first, one module each:

- shapes.py: what the teacher looks like (`TeacherShape`) and what its student will (`student_config`), or the
  `ConversionError` naming the knob that does not fit.
- calibration.py (`calibrate`): run the teacher over teacher-written token sequences and keep, per layer, what
  the mappings need: the attention input's second moment, each query/key channel pair's norm, FFN activations of
  a token sample, and each block's importance (Minitron's BI: 1 - cos(block input, block output)).
- attention.py (`convert_attention`): GQA → MLA. Partial RoPE keeps, per KV head, the channel pairs with the
  most q·k norm; the rest of the key and the whole value go jointly into the latent by an activation-aware SVD.
  Each KV head keeps its own rope key (`n_rope_heads`), so the conversion is exact at full rank (the exact
  layout). `convert_attention_standard`: DeepSeek-V3's layout, which engines run: one rope key shared by all
  heads (TransMLA's RoRoPE), the latent RMSNorm (with a norm anchor channel), no biases.
- ffn.py (`convert_ffn`): dense FFN → DeepSeekMoE. The most-activated neurons form the shared expert; the rest
  are split into equal routed experts by balanced k-means on their co-activation, and the router is fitted to
  predict each expert's activation mass. With every expert active the layer is the dense FFN.
- assembly.py (`convert`): depth pruning (`choose_layers`: the layers named, else the most important by BI),
  then every kept layer mapped.
- measurement.py: what the student kept (`fidelity`: next-token KL and perplexities on held-out teacher text)
  and what it saves (`economics`: parameters and KV cache beside the teacher's).
- recovery.py (`recover`): the converted student KL-distilled back towards the teacher before task distillation.

Shape suffixes follow the legend in `pipeline/model/__init__.py`.
"""

from __future__ import annotations

from pipeline.model.convert.assembly import ConversionChoices, choose_layers, convert
from pipeline.model.convert.attention import convert_attention, convert_attention_standard, rope_pairs
from pipeline.model.convert.calibration import Calibration, LayerStats, calibrate, pad_batch
from pipeline.model.convert.ffn import balanced_kmeans, convert_ffn
from pipeline.model.convert.measurement import HeldOutFidelity, economics, fidelity, next_token_kl
from pipeline.model.convert.recovery import RecoveryReport, kl_to_teacher, recover
from pipeline.model.convert.shapes import (
    SUPPORTED,
    TEACHER_FIELDS,
    ConversionError,
    Layout,
    TeacherShape,
    student_config,
)

__all__ = [
    "SUPPORTED",
    "TEACHER_FIELDS",
    "Calibration",
    "ConversionChoices",
    "ConversionError",
    "HeldOutFidelity",
    "LayerStats",
    "Layout",
    "RecoveryReport",
    "TeacherShape",
    "balanced_kmeans",
    "calibrate",
    "choose_layers",
    "convert",
    "convert_attention",
    "convert_attention_standard",
    "convert_ffn",
    "economics",
    "fidelity",
    "kl_to_teacher",
    "next_token_kl",
    "pad_batch",
    "recover",
    "rope_pairs",
    "student_config",
]
