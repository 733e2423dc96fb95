"""The student as an MLflow model: logged with its weights and tokenizer, registered, loadable anywhere.

`log_student` logs a saved student directory (`Transformer.save_pretrained(dir, tokenizer)`) as a pyfunc model on
a run and registers it; `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` then gives a model whose `predict` takes
questions (a DataFrame with a `prompt` column, or a list of strings), wraps each in the student's prompt format and
chat template, and returns the generated answers. Groundwork for `train`/`register` and for serving.
"""

from __future__ import annotations

from pathlib import Path

STUDENT_ARTIFACT = "student"  # the saved student directory, as an artifact of the logged model


def log_student(model_dir: str | Path, run_id: str, tracking_uri: str, registered_name: str | None = None):
    """Log a saved student on run `run_id` as a pyfunc model; register it under `registered_name` if given.

    Returns the registered `ModelVersion` (or the logged model's info when not registering).
    """
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from pipeline.tracking import using_tracking_uri

    signature = infer_signature(pd.DataFrame({"prompt": ["What is 2 + 2?"]}), ["The final answer is 4."],
                                params={"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0})
    with using_tracking_uri(tracking_uri):
        with mlflow.start_run(run_id=run_id):
            # models-from-code: the model is the source file, not a pickled object
            info = mlflow.pyfunc.log_model(name="model",
                                           python_model=str(Path(__file__).with_name("student_pyfunc.py")),
                                           artifacts={STUDENT_ARTIFACT: str(model_dir)}, signature=signature,
                                           pip_requirements=_requirements())
        if registered_name is None:
            return info
        return mlflow.register_model(info.model_uri, registered_name)


def _requirements() -> list[str]:
    """The packages the loaded model imports, pinned to what logged it."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "safetensors", "pydantic", "mlflow")]
