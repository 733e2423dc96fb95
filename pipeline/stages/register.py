"""Stage `register`: the trained student into the MLflow Model Registry, promoted only when it passes the gate.

The MLflow model that `train` logged on its run becomes a new version of `registry.model_name` (or the version
already registered from that run is reused, when only the evaluation changed). Alias `champion` moves to it when
student pass@1 >= `gate_ratio` x teacher pass@1 (the same prompt), the student beats the constant-answer floor on
every task, and, with `must_beat_champion`, >= the pass@1 recorded on the current champion; otherwise it gets alias
`challenger`. The decision and its reason are tags of the version and of the run, and the output `registration`
(registration.json) records name, version, alias and reason.

The output `exports` holds the student exported for other engines (`registry.exports`: hf/, a transformers
`deepseek_v3` directory, and gguf/, a llama.cpp file at `registry.gguf_quant`), and the version's tag
`moeforge.exports` points at it. A student no engine can run (moeforge's exact layout) is registered all the same;
exports.json then says why nothing was exported, and so does the tag.
"""

from __future__ import annotations

import shutil

from pipeline.stage import Stage, StageContext
from pipeline.stages.artifact_specs import EXPORTS, REGISTRATION
from pipeline.stages.results import Exports, Registration, read_summary, write_result


class Register(Stage):
    name = "register"
    inputs = ("student", "eval_report")
    outputs = (REGISTRATION, EXPORTS)
    config_sections = ("registry",)
    key_metrics = ("version",)
    description = "register the student; alias champion if it passes the gate, else challenger"

    def run(self, ctx: StageContext) -> None:
        from pipeline.student.registry import champion_pass_at_1, gate, promote, register_run_model

        cfg = ctx.config.registry
        name = cfg.model_name
        summary = read_summary(ctx.input_path("eval_report"))
        student, teacher = summary.student.pass_at_1, summary.teacher.pass_at_1
        train_run = ctx.call.inputs["student"].run_id
        if not train_run:
            raise RuntimeError("the student artifact does not name the train run that logged it")
        version = register_run_model(ctx.client, ctx.call.tracking_uri, name, train_run)
        champion = champion_pass_at_1(ctx.client, name, exclude_version=version.version)
        alias, reason = gate(
            student,
            teacher,
            champion,
            cfg.gate_ratio,
            cfg.must_beat_champion,
            summary.student.pass_at_1_by_task,
            summary.floor.pass_at_1_by_task if summary.floor else None,
        )
        promote(
            ctx.client,
            version,
            alias,
            {
                "moeforge.pass_at_1": student,
                "moeforge.teacher_pass_at_1": teacher,
                "moeforge.alias": alias,
                "moeforge.gate_reason": reason,
                "moeforge.eval_run_id": ctx.call.inputs["eval_report"].run_id,
            },
        )
        ctx.set_tags(
            {
                "moeforge.registered_model": f"{name}/{version.version}",
                "moeforge.alias": alias,
                "moeforge.gate_reason": reason,
            }
        )
        exports = self.export(ctx)
        ctx.client.set_model_version_tag(
            name, version.version, "moeforge.exports", exports.skipped or f"runs:/{ctx.run_id}/outputs/exports"
        )
        ctx.log_metrics({"version": int(version.version), "champion": float(alias == "champion")})
        registration = Registration(
            name=name,
            version=int(version.version),
            alias=alias,
            reason=reason,
            model_uri=f"models:/{name}@{alias}",
            student_pass_at_1=student,
            teacher_pass_at_1=teacher,
            champion_pass_at_1=champion,
            exports=exports,
        )
        write_result(ctx.output_dir("registration"), registration)

    def export(self, ctx: StageContext) -> Exports:
        """The student in every format of `registry.exports`, into the `exports` output; returns what was written
        (each format's path inside the output) or why nothing was."""
        from pipeline.export import ExportError, export

        cfg, out = ctx.config.registry, ctx.output_dir("exports")
        written: dict[str, str] = {}
        try:
            for fmt in cfg.exports:
                path = export(ctx.input_path("student"), fmt, out / fmt, cfg.gguf_quant if fmt == "gguf" else "f32")
                written[fmt] = str(path.relative_to(out))
        except ExportError as e:
            ctx.set_tags({"moeforge.warning": f"the student was registered but not exported: {e}"})
            written = {"skipped": str(e)}
            for fmt in cfg.exports:
                shutil.rmtree(out / fmt, ignore_errors=True)
        exports = Exports.model_validate(written)
        write_result(out, exports)
        return exports
