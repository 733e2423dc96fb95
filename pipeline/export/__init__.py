"""The trained student in the formats other engines load: a Hugging Face `deepseek_v3` directory (transformers,
vLLM, SGLang) and a llama.cpp `deepseek2` GGUF file (llama.cpp, Ollama, LM Studio).

- engine_layout.py (`check_engine_layout`): whether a student is in DeepSeek-V3's standard layout, which every
  engine hard-codes; a student in moeforge's exact layout is refused with the knob to change.
- hf.py (`export_hf`): config.json, safetensors under transformers' names, the tokenizer with its chat template and
  generation_config.json.
- gguf_file.py (`export_gguf`): the `deepseek2` architecture written with the `gguf` package, the tokenizer and
  chat template inside; quantized by llama.cpp's own quantizer (the `moeforge[llamacpp]` extra).

`export` is the entry point `moeforge export` and `register` call. Every export is written to a temporary sibling
and renamed into place whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.export.engine_layout import ExportError, check_engine_layout

ExportFormat = Literal["hf", "gguf"]
Quant = Literal["f32", "f16", "q8_0", "q4_1"]

__all__ = ["ExportError", "ExportFormat", "Quant", "check_engine_layout", "export"]


def export(student_dir: str | Path, fmt: ExportFormat, out: str | Path, quant: Quant = "f32") -> Path:
    """The saved student in `student_dir` exported as `fmt` into the folder `out`; returns what was written (the
    HF directory, or the .gguf file inside `out`). Raises `ExportError` for a student no engine can run."""
    from transformers import AutoTokenizer

    from pipeline.model import Transformer

    model = Transformer.from_pretrained(student_dir).eval()  # export_hf / export_gguf refuse a non-standard layout
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    if fmt == "hf":
        if quant != "f32":
            raise ExportError(f"--quant {quant} applies to gguf; the hf export is fp32 (engines cast on load)")
        from pipeline.export.hf import export_hf

        return export_hf(model, tokenizer, Path(out))
    from pipeline.export.gguf_file import export_gguf

    return export_gguf(model, tokenizer, Path(out), quant)
