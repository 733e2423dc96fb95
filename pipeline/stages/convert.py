"""Stage `convert`: the student before training, built from the teacher's own weights (`model.init: teacher`).

The teacher (a local transformers directory, or the default GGUF dequantized once) is rebuilt as the MoE student
by `pipeline.model.convert`, calibrated on the teacher's own text: its samples of the training prompts from
`generate`, accepted or not (the held-out prompts are never touched). Samples are split, seeded, into calibration
and held-out sets; before any training the student's next-token KL to the teacher and both perplexities on the
held-out text are metrics of the run, beside the parameter and KV-cache economics. With `convert.recovery_steps`
above 0 the converted student is then KL-distilled towards the teacher on the non-held-out text
(`pipeline/model/convert/recovery.py`): the metrics are the recovered student's, `kl_to_teacher_converted` the
conversion's alone. With `model.init: scratch` the output is a randomly initialised student of the configured
size, so `train` always starts from this artifact.

Output `initial_student`: safetensors + config.json + the tokenizer, and conversion.json.
"""

from __future__ import annotations

import os
import random

from pipeline.stage import Stage, StageContext
from pipeline.stages.artifact_specs import INITIAL_STUDENT, SAMPLES
from pipeline.stages.results import ConversionReport, Economics, Fidelity, Recovery, ScratchSize, write_conversion


class Convert(Stage):
    name = "convert"
    inputs = ("samples",)
    outputs = (INITIAL_STUDENT,)
    config_sections = ("teacher", "distill", "convert", "model")
    key_metrics = ConversionReport.KEY_METRICS
    description = "the student from the teacher's weights (MLA, MoE, pruned), calibrated on teacher text"

    def run(self, ctx: StageContext) -> None:
        import torch
        from transformers import AutoTokenizer

        from pipeline.model.transformer import Transformer
        from pipeline.teacher.hf import default_cache_dir, resolve_model_dir

        cfg = ctx.config
        out = ctx.output_dir("initial_student")
        if cfg.model.init == "scratch":
            if cfg.convert.recovery_steps:
                raise ValueError(
                    f"convert.recovery_steps={cfg.convert.recovery_steps} recovers a student converted "
                    "from the teacher, but model.init=scratch converts nothing: set "
                    "convert.recovery_steps=0 or model.init=teacher"
                )
            name = cfg.teacher.vocabulary(cfg.distill.tokenizer)
            tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(name, default_cache_dir())))
            torch.manual_seed(cfg.convert.seed)
            student = Transformer.for_tokenizer(cfg.model, tokenizer)
            sizes = student.num_params()
            ctx.log_metrics(ScratchSize(params_total=sizes["total"], params_active=sizes["active"]).to_metrics())
            student.save_pretrained(out, tokenizer)
            write_conversion(out, ConversionReport(init="scratch"))
            return
        weights = cfg.teacher.local_weights()
        assert weights is not None, "config validation refuses model.init=teacher without the teacher's weights"
        self.convert(ctx, resolve_model_dir(weights, default_cache_dir()))

    def convert(self, ctx: StageContext, teacher_dir) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.model.convert import TeacherShape, calibrate, convert, economics, fidelity

        cfg = ctx.config
        c = cfg.convert
        # the stage task reserves no CPU (ray.stage_num_cpus) and Ray then gives torch one thread; nothing else of
        # the pipeline runs while the conversion does, so it takes the node's cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
        teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
        texts = teacher_texts(ctx.read_table("samples", SAMPLES).to_pylist(), tokenizer, cfg.model.max_seq_len)
        random.Random(c.seed).shuffle(texts)
        if len(texts) < 2:
            raise ValueError(
                f"convert needs at least 2 teacher samples with text, got {len(texts)}: raise data.num_train_prompts"
            )
        n_held = min(c.held_out_samples, len(texts) // 2)
        held_out, calibration = texts[:n_held], texts[n_held : n_held + c.calibration_samples]
        calib = calibrate(teacher, calibration, ffn_sample=c.ffn_sample_tokens, seed=c.seed)
        student, report = convert(
            teacher,
            cfg.model,
            calib,
            keep_layers=c.keep_layers,
            seed=c.seed,
            layout=c.layout,
            router_logit_std=c.router_logit_std,
        )
        if len(tokenizer) != student.cfg.vocab_size:
            raise ValueError(
                f"the teacher's tokenizer has {len(tokenizer)} tokens but its embedding {student.cfg.vocab_size} rows"
            )
        fid = fidelity(teacher, student, held_out)
        recovery = None
        if c.recovery_steps:
            recovery = self.recover(ctx, teacher, student, texts[n_held:], fid)
            fid = fidelity(teacher, student, held_out)
        conversion = ConversionReport(
            init="teacher",
            teacher=str(cfg.teacher.model),
            layout=report.layout,
            layers=report.layers,
            rope_pairs=report.rope_pairs,
            rope_key_energy=report.rope_key_energy,
            latent_anchor=report.latent_anchor,
            latent_scale=report.latent_scale,
            block_importance=report.importance,
            calibration_samples=len(calibration),
            held_out_samples=len(held_out),
            fidelity=Fidelity(
                kl_to_teacher=fid.kl,
                student_ppl=fid.student_ppl,
                teacher_ppl=fid.teacher_ppl,
                held_out_tokens=fid.tokens,
                calibration_tokens=calib.tokens,
            ),
            recovery=recovery,
            economics=Economics.model_validate(
                economics(student.cfg, student.num_params(), TeacherShape.of(teacher.config))
            ),
        )
        ctx.log_metrics(conversion.to_metrics())
        ctx.set_tags({"moeforge.convert.layers": ",".join(map(str, report.layers))})
        student.save_pretrained(ctx.output_dir("initial_student"), tokenizer)
        write_conversion(ctx.output_dir("initial_student"), conversion)

    def recover(self, ctx: StageContext, teacher, student, texts: list[list[int]], converted) -> Recovery:
        """Recovery on every non-held-out teacher text; its per-step KL is the `recovery_kl` series. `converted`:
        the fidelity of the student as converted, before recovery."""
        from pipeline.model.convert import recover

        c = ctx.config.convert
        report = recover(
            teacher, student, texts, c.recovery_steps, lr=c.recovery_lr, batch_size=c.recovery_batch_size, seed=c.seed
        )
        for step, kl in enumerate(report.losses, start=1):
            ctx.log_metrics({"recovery_kl": kl}, step=step)
        return Recovery(
            recovery_tokens=report.tokens,
            recovery_seconds=report.seconds,
            recovery_tokens_per_s=report.tokens / max(report.seconds, 1e-9),
            kl_to_teacher_converted=converted.kl,
            student_ppl_converted=converted.student_ppl,
        )


def teacher_texts(rows: list[dict], tokenizer, max_len: int) -> list[list[int]]:
    """Token ids of every sample the teacher wrote: the student's conversation, then the teacher's raw text."""
    from pipeline.data.prompts import chat_token_ids, student_messages

    texts = []
    for r in rows:
        if not r.get("raw_completion"):
            continue  # a teacher error: no text
        ids = chat_token_ids(tokenizer, student_messages(r["question"]))
        ids += tokenizer.encode(r["raw_completion"], add_special_tokens=False)
        texts.append(ids[:max_len])
    return texts
