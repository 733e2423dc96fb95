"""The student as a Hugging Face `deepseek_v3` model directory, loadable by transformers without remote code and
read by vLLM and SGLang.

The weights are copied into transformers' own `DeepseekV3ForCausalLM` (`pipeline.model.hf_compat`, checked for
parity by the tests) and saved by it, so the names and layouts are transformers'. vLLM reads the routing from
`scoring_func: sigmoid` and `topk_method: noaux_tc` (its defaults are softmax and no correction bias).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.export.engine_layout import check_engine_layout


def hf_config(model):
    """transformers' `DeepseekV3Config` of the student, with the keys vLLM and SGLang also read."""
    from pipeline.model.hf_compat import to_hf_config

    cfg = to_hf_config(model.cfg)
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    cfg.scoring_func = "sigmoid"  # vLLM: sigmoid affinities ...
    cfg.topk_method = "noaux_tc"  # ... with the correction bias in the choice (DeepSeek-V3's)
    cfg.dtype = "float32"
    return cfg


@torch.no_grad()
def export_hf(model, tokenizer, out: Path) -> Path:
    """Write the HF directory `out` (replacing an older one); returns `out`."""
    import shutil

    from transformers import DeepseekV3ForCausalLM, GenerationConfig

    from pipeline.artifacts import atomic_path
    from pipeline.model.hf_compat import copy_model_to_hf

    check_engine_layout(model)
    hf = DeepseekV3ForCausalLM(hf_config(model)).eval()
    copy_model_to_hf(model, hf)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    with atomic_path(out) as tmp:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))  # with its chat template
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
        ).save_pretrained(str(tmp))
    return out
