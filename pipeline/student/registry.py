"""The student as an MLflow model: logged with its weights and tokenizer, registered, loadable anywhere.

`log_student` logs a saved student directory (`Transformer.save_pretrained(dir, tokenizer)`) as a pyfunc model on
a run and registers it; `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` then gives a model whose `predict` takes
questions (a DataFrame with a `prompt` column, or a list of strings), wraps each in the student's prompt format and
chat template, and returns the generated answers. `gate` decides a new version's alias (`champion` or
`challenger`) and `promote` sets it, with the decision's tags, on the version.
"""

from __future__ import annotations

from pathlib import Path

STUDENT_ARTIFACT = "student"  # the saved student directory, as an artifact of the logged model
# the student directory's content hash (`pipeline.artifacts.content_hash`): set on the run that logged the model and
# on every registry version made from it; serving refuses a download that does not match it
CONTENT_HASH_TAG = "moeforge.student_content_hash"


def log_student(model_dir: str | Path, run_id: str, tracking_uri: str, registered_name: str | None = None):
    """Log a saved student on run `run_id` as a pyfunc model; register it under `registered_name` if given.

    Returns the registered `ModelVersion` (or the logged model's info when not registering).
    """
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from pipeline.artifacts import content_hash
    from pipeline.tracking import using_tracking_uri

    digest = content_hash(Path(model_dir))
    signature = infer_signature(
        pd.DataFrame({"prompt": ["What is 2 + 2?"]}),
        ["The final answer is 4."],
        params={"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0},
    )
    with using_tracking_uri(tracking_uri):
        with mlflow.start_run(run_id=run_id):
            # models-from-code: the model is the source file, not a pickled object
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc.py")),
                artifacts={STUDENT_ARTIFACT: str(model_dir)},
                signature=signature,
                pip_requirements=_requirements(),
            )
            mlflow.set_tag(CONTENT_HASH_TAG, digest)
        if registered_name is None:
            return info
        return mlflow.register_model(info.model_uri, registered_name, tags={CONTENT_HASH_TAG: digest})


def _requirements() -> list[str]:
    """The packages the loaded model imports, pinned to what logged it."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "safetensors", "pydantic", "mlflow")]


def register_run_model(client, tracking_uri: str, name: str, train_run: str):
    """The registry version made from the model `train_run` logged: reused if there is one, else created."""
    import mlflow

    from pipeline.tracking import using_tracking_uri

    existing = client.search_model_versions(f"name = '{name}' and run_id = '{train_run}'")
    if existing:
        return max(existing, key=lambda v: int(v.version))
    tags = client.get_run(train_run).data.tags
    model_uri, digest = tags.get("moeforge.model_uri"), tags.get(CONTENT_HASH_TAG)
    if not model_uri or not digest:
        raise RuntimeError(
            f"train run {train_run} logged no MLflow model with a content hash (tags "
            f"moeforge.model_uri and {CONTENT_HASH_TAG} are needed)"
        )
    with using_tracking_uri(tracking_uri):
        return mlflow.register_model(
            model_uri, name, tags={"moeforge.train_run_id": train_run, CONTENT_HASH_TAG: digest}
        )


def champion_pass_at_1(client, name: str, exclude_version: str | None = None) -> float | None:
    """The pass@1 recorded on the current champion of `name`, if there is one (and it is not `exclude_version`)."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, "champion")
    except MlflowException:  # no champion yet
        return None
    if current.version == exclude_version or "moeforge.pass_at_1" not in current.tags:
        return None
    return float(current.tags["moeforge.pass_at_1"])


def gate(
    student: float,
    teacher: float,
    champion: float | None,
    ratio: float,
    must_beat_champion: bool,
    student_by_task: dict[str, float] | None = None,
    floor_by_task: dict[str, float] | None = None,
) -> tuple[str, str]:
    """(alias, reason) for a new version with `student` pass@1, given the teacher's (same prompt) and the champion's.

    Champion only when the student reaches `ratio` x the teacher's pass@1 and, on every task, beats the
    constant-answer floor (always answering the held-out split's most frequent answer): a student that only
    learned the answer prior is a challenger however it compares with the teacher.
    """
    need = ratio * teacher
    if student == 0:
        return "challenger", "student pass@1 is 0: it solved none of the held-out prompts"
    if student < need:
        return "challenger", (
            f"student pass@1 {student:.3f} < gate_ratio {ratio:g} x teacher pass@1 {teacher:.3f} = {need:.3f}"
        )
    floors = floor_by_task or {}
    below = [
        f"{t} {(student_by_task or {}).get(t, 0.0):.3f} <= floor {f:.3f}"
        for t, f in sorted(floors.items())
        if (student_by_task or {}).get(t, 0.0) <= f
    ]
    if below:
        return "challenger", f"student does not beat the constant-answer floor on {'; '.join(below)}"
    if must_beat_champion and champion is not None and student < champion:
        return "challenger", f"student pass@1 {student:.3f} < current champion's {champion:.3f}"
    reason = f"student pass@1 {student:.3f} >= gate_ratio {ratio:g} x teacher pass@1 {teacher:.3f}"
    if floors:
        reason += " and beats the constant-answer floor on every task"
    if must_beat_champion and champion is not None:
        reason += f" and >= current champion's {champion:.3f}"
    return "champion", reason


def promote(client, version, alias: str, tags: dict[str, object]) -> None:
    """Give `version` the alias `alias` (a version holds one of champion/challenger only) and tag the decision."""
    client.set_registered_model_alias(version.name, alias, version.version)
    other = "challenger" if alias == "champion" else "champion"
    if other in (version.aliases or []):  # a version re-gated (e.g. a stricter gate) holds one alias only
        client.delete_registered_model_alias(version.name, other)
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, str(value))
