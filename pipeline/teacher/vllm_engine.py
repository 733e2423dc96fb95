"""The `vllm` teacher backend: vLLM's offline engine on a GPU node (`pip install 'moeforge[vllm]'`).

vLLM is imported only when this backend is chosen, so the CPU default never needs it. Prompts are tokenized with
the model's own chat template, as in the `hf` backend, and sampled with per-batch seeds.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.data.generation import Generation
from pipeline.data.prompts import chat_token_ids
from pipeline.teacher.base import TeacherCapabilities, split_over_context
from pipeline.teacher.hf import resolve_model_dir


class VLLMTeacher:
    def __init__(self, model: str, dtype: str = "bfloat16", cache_dir: str | Path = ".moeforge/cache"):
        try:
            import vllm
        except ImportError:
            raise ImportError(
                "teacher.backend 'vllm' needs vLLM on the actor's node: pip install 'moeforge[vllm]' "
                "(GPU only), or use backend 'hf' or 'openai'"
            ) from None
        model_dir = resolve_model_dir(model, cache_dir)
        self.teacher_id = f"vllm:{Path(model_dir).name}"
        self.llm = vllm.LLM(model=str(model_dir), dtype=dtype)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_context = self.llm.llm_engine.model_config.max_model_len
        self._vllm = vllm

    def capabilities(self) -> TeacherCapabilities:
        # scoring loads the same weights through transformers (`load_teacher(..., for_scoring=True)`)
        return TeacherCapabilities(False, 0, "vLLM's offline engine, text only", "score with for_scoring=True")

    def score(self, sequences, starts, top_k):
        raise ValueError("vLLM's engine here generates text only: load the teacher with for_scoring=True to score")

    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        prompts = [chat_token_ids(self.tokenizer, c) for c in conversations]
        params = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        results, todo = split_over_context(prompts, max_new_tokens, self.max_context)
        t0 = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": prompts[i]} for i in todo], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        for i, out in zip(todo, outputs, strict=True):
            c = out.outputs[0]
            results[i] = Generation(
                c.text, len(prompts[i]), len(c.token_ids), "length" if c.finish_reason == "length" else "stop", seconds
            )
        return results
