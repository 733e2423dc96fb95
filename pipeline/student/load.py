"""The student answering questions: the prompt format it was trained on, its chat template, batched decoding.

One place for what `evaluate`, the MLflow pyfunc model and serving all do with a trained student: wrap each
question in `student_messages`, apply the tokenizer's chat template, generate, and decode up to the end-of-turn
token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.model.precision import InferenceDtype, log_precision, resolve_precision


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


class Student:
    """A saved student (`Transformer.save_pretrained(dir, tokenizer)`) loaded for answering, in the inference dtype
    `dtype` resolves to on `device` (`pipeline.model.precision`; logged, and kept as `precision`)."""

    def __init__(
        self,
        directory: str | Path,
        device: str = "cpu",
        dtype: InferenceDtype = "float32",
        compile_decode_max_batch: int = 0,
    ):
        from transformers import AutoTokenizer

        from pipeline.model import Transformer
        from pipeline.model.generate import CompiledDecode

        self.precision = log_precision(resolve_precision(dtype, device), f"the student {Path(directory).name}")
        model = Transformer.from_pretrained(directory, map_location=device).eval()
        self.model = model.to(self.precision.dtype)
        self.compiled = CompiledDecode(self.model, compile_decode_max_batch) if compile_decode_max_batch else None
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))

    def answer(
        self,
        questions: list[str],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 8,
    ) -> list[Answer]:
        """Greedy (temperature 0) or sampled answers, `batch_size` questions per decoding batch."""
        from pipeline.data.prompts import chat_token_ids, student_messages
        from pipeline.model.generate import SamplingParams, generate

        eos = self.tokenizer.eos_token_id
        sampling = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop_token_ids=(eos,), seed=seed
        )
        out: list[Answer] = []
        for start in range(0, len(questions), batch_size):
            prompts = [
                chat_token_ids(self.tokenizer, student_messages(str(q))) for q in questions[start : start + batch_size]
            ]
            for prompt, c in zip(prompts, generate(self.model, prompts, sampling, self.compiled), strict=True):
                text = self.tokenizer.decode([t for t in c.tokens if t != eos], skip_special_tokens=True)
                out.append(Answer(text, len(prompt), len(c.tokens), c.finish_reason or "length"))
        return out
