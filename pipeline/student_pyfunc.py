"""The student's MLflow pyfunc model, logged from code (see `pipeline/registry.py`): questions in, answers out."""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc

from pipeline.registry import STUDENT_ARTIFACT


class StudentModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: questions in, generated answers out (greedy unless `temperature` is given)."""

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from pipeline.model import Transformer

        directory = context.artifacts[STUDENT_ARTIFACT]
        self.model = Transformer.from_pretrained(directory).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from pipeline.data.prompts import student_messages
        from pipeline.model import SamplingParams, generate
        from pipeline.teacher.base import chat_token_ids

        questions = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        params = params or {}
        sampling = SamplingParams(max_new_tokens=int(params.get("max_new_tokens", 128)),
                                  temperature=float(params.get("temperature", 0.0)),
                                  top_p=float(params.get("top_p", 1.0)),
                                  stop_token_ids=(self.tokenizer.eos_token_id,), seed=params.get("seed"))
        prompts = [chat_token_ids(self.tokenizer, student_messages(str(q))) for q in questions]
        out = generate(self.model, prompts, sampling)
        return [self.tokenizer.decode([t for t in c.tokens if t != self.tokenizer.eos_token_id],
                                      skip_special_tokens=True) for c in out]


mlflow.models.set_model(StudentModel())
