"""The student's MLflow pyfunc model, logged from code (see `registry.py` beside it): questions in, answers out."""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc

from pipeline.student.registry import STUDENT_ARTIFACT


class StudentModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: questions in, generated answers out (greedy unless `temperature` is given)."""

    def load_context(self, context) -> None:
        from pipeline.student import Student

        self.student = Student(context.artifacts[STUDENT_ARTIFACT])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        questions = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        params = params or {}
        seed = params.get("seed")
        answers = self.student.answer(
            [str(q) for q in questions],
            max_new_tokens=int(params.get("max_new_tokens", 128)),
            temperature=float(params.get("temperature", 0.0)),
            top_p=float(params.get("top_p", 1.0)),
            seed=None if seed is None else int(seed),
        )
        return [a.text for a in answers]


mlflow.models.set_model(StudentModel())
