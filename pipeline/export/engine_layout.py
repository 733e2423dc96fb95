"""Whether a student is in DeepSeek-V3's standard layout: what transformers, vLLM, SGLang and llama.cpp hard-code.

Those engines share one rope key across heads with the standard frequencies of `rope_theta`, always apply the
latent RMSNorm, weigh the chosen experts by normalised sigmoid affinities x `routed_scaling_factor`, and have no
query or KV down-projection biases. A student that differs would either be refused by them or, for the rope
frequencies, load and silently compute the wrong attention, so it is refused here, before anything is written.
"""

from __future__ import annotations

import torch

from pipeline.model.mla import MLA, rope_frequencies


class ExportError(ValueError):
    """The student cannot be exported as asked; the message says why and which knob to change."""


def check_engine_layout(model) -> None:
    """Raise `ExportError` (one line, naming the knob) unless `model` is in the standard layout."""
    cfg = model.cfg
    exact = {
        f"n_rope_heads {cfg.n_rope_heads}": cfg.n_rope_heads != 1,
        "no latent norm": not cfg.kv_norm,
        "unit expert weights": cfg.route_weight != "normalized",
    }
    if deviations := [k for k, v in exact.items() if v]:
        raise ExportError(
            f"this student is in moeforge's exact layout ({', '.join(deviations)}), which no engine runs: "
            "convert it with convert.layout: standard (--set convert.layout=standard)"
        )
    if cfg.qkv_bias:
        raise ExportError("this student has query/KV biases (model.qkv_bias), which the engines' DeepSeek-V3 lacks")
    if cfg.mtp_depth:
        raise ExportError("this student has a multi-token-prediction head (model.mtp_depth: 1); export needs 0")
    want = rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta)
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        assert isinstance(attn, MLA)
        if not torch.allclose(attn.inv_freq[0].float(), want, rtol=1e-5, atol=0):
            raise ExportError(
                f"layer {i}'s rope frequencies (MLA.inv_freq) are not the standard ones of rope_theta "
                f"{cfg.rope_theta:g}: engines would compute another attention; convert with convert.layout: standard"
            )
