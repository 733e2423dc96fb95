"""Stage `register`: the trained student into the MLflow Model Registry, promoted only when it passes the gate.

The MLflow model that `train` logged on its run becomes a new version of `registry.model_name` (or the
version already registered from that run is reused, when only the evaluation changed). Alias `champion` moves to
it when student pass@1 >= `gate_ratio` x teacher pass@1 and, with `must_beat_champion`, >= the pass@1 recorded on
the current champion; otherwise it gets alias `challenger`. The decision and its reason are tags of the version
and of the run, and the output `registration` (registration.json) records name, version, alias and reason.
"""

from __future__ import annotations

import json

from pipeline.artifacts import ArtifactSpec, write_json
from pipeline.stage import Stage, StageContext

REGISTRATION = ArtifactSpec("registration", "files", description="registry name, version, alias and the gate's reason")


def gate(student: float, teacher: float, champion: float | None, ratio: float, must_beat_champion: bool
         ) -> tuple[str, str]:
    """(alias, reason) for a new version with `student` pass@1, given the teacher's and the champion's."""
    need = ratio * teacher
    if student == 0:
        return "challenger", "student pass@1 is 0: it solved none of the held-out prompts"
    if student < need:
        return "challenger", (f"student pass@1 {student:.3f} < gate_ratio {ratio:g} x teacher pass@1 "
                              f"{teacher:.3f} = {need:.3f}")
    if must_beat_champion and champion is not None and student < champion:
        return "challenger", f"student pass@1 {student:.3f} < current champion's {champion:.3f}"
    reason = f"student pass@1 {student:.3f} >= gate_ratio {ratio:g} x teacher pass@1 {teacher:.3f}"
    if must_beat_champion and champion is not None:
        reason += f" and >= current champion's {champion:.3f}"
    return "champion", reason


class Register(Stage):
    name = "register"
    inputs = ("student", "eval_report")
    outputs = (REGISTRATION,)
    config_sections = ("registry",)
    key_metrics = ("version",)
    description = "register the student; alias champion if it passes the gate, else challenger"

    def run(self, ctx: StageContext) -> None:
        from mlflow.exceptions import MlflowException

        cfg = ctx.config.registry
        name = cfg.model_name
        summary = json.loads((ctx.input_path("eval_report") / "summary.json").read_text())
        student, teacher = summary["student"]["pass_at_1"], summary["teacher"]["pass_at_1"]
        version = self.version_of_train_run(ctx, name)
        champion = None
        try:
            current = ctx.client.get_model_version_by_alias(name, "champion")
            if current.version != version.version and "moeforge.pass_at_1" in current.tags:
                champion = float(current.tags["moeforge.pass_at_1"])
        except MlflowException:  # no champion yet
            pass
        alias, reason = gate(student, teacher, champion, cfg.gate_ratio, cfg.must_beat_champion)
        ctx.client.set_registered_model_alias(name, alias, version.version)
        other = "challenger" if alias == "champion" else "champion"
        if other in (version.aliases or []):  # a version re-gated (e.g. a stricter gate) holds one alias only
            ctx.client.delete_registered_model_alias(name, other)
        for key, value in {"moeforge.pass_at_1": student, "moeforge.teacher_pass_at_1": teacher,
                           "moeforge.alias": alias, "moeforge.gate_reason": reason,
                           "moeforge.eval_run_id": ctx.call.inputs["eval_report"].run_id}.items():
            ctx.client.set_model_version_tag(name, version.version, key, str(value))
        ctx.set_tags({"moeforge.registered_model": f"{name}/{version.version}", "moeforge.alias": alias,
                      "moeforge.gate_reason": reason})
        ctx.log_metrics({"version": int(version.version), "champion": float(alias == "champion")})
        write_json(ctx.output_dir("registration") / "registration.json",
                   {"name": name, "version": int(version.version), "alias": alias, "reason": reason,
                    "model_uri": f"models:/{name}@{alias}", "student_pass_at_1": student,
                    "teacher_pass_at_1": teacher, "champion_pass_at_1": champion})

    def version_of_train_run(self, ctx: StageContext, name: str):
        """The registry version made from `train`'s logged model: reused if there is one, else created."""
        import mlflow

        from pipeline.tracking import using_tracking_uri

        train_run = ctx.call.inputs["student"].run_id
        if not train_run:
            raise RuntimeError("the student artifact does not name the train run that logged it")
        existing = ctx.client.search_model_versions(f"name = '{name}' and run_id = '{train_run}'")
        if existing:
            return max(existing, key=lambda v: int(v.version))
        model_uri = ctx.client.get_run(train_run).data.tags.get("moeforge.model_uri")
        if not model_uri:
            raise RuntimeError(f"train run {train_run} logged no MLflow model (tag moeforge.model_uri is missing)")
        with using_tracking_uri(ctx.call.tracking_uri):
            return mlflow.register_model(model_uri, name, tags={"moeforge.train_run_id": train_run})
