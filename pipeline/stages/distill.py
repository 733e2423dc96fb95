"""Stage `distill`: the teacher's soft targets for every accepted sample, as an offline KD dataset.

Accepted samples from `generate` are cut into partitions of `distill.shard_size`; teacher actors (the same role
as in `generate`, loaded once each) run one forward pass per batch over each accepted completion and keep the
top-k next-token log-probs and the tail mass at every completion position, stored at the student's positions of
its training text (instruction + question + completion, see `pipeline/distill/targets.py`). What the teacher reads
before the completion is `distill.teacher_context`: `best` (the default), its best prompt, the task's worked
examples that the student never sees, so the student learns to answer zero-shot as the teacher answers with
examples (context distillation); `same`, the student's own prompt, where this teacher is its weaker self. Each
partition becomes one shard (retry- and resume-safe, as in `generate`). The teacher's tokenizer is saved beside
the shards with its fingerprint: the student must use it.

What the teacher can do decides the route (`TeacherCapabilities`, asked of a loaded teacher): a local teacher
scores by a forward pass; a remote one by echoing the text with its log-probs, once the server's tokens are found
to be the local tokenizer's (`teacher.weights`, else `distill.tokenizer`). A teacher that cannot score falls back
to sequence-level distillation: the rows hold the tokenized sequences and masks with empty targets (plain SFT on
the completion), and the run carries a warning tag that says why. A sample the server tokenises differently from
the rest (at the seam of the teacher's context and the completion, say) keeps its row with empty targets too
(counted in `sequence_level_samples`, and a warning tag names the context): no sample is dropped.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.artifacts import write_json
from pipeline.distill import targets as T
from pipeline.stage import Stage, StageContext
from pipeline.stages.artifact_specs import SAMPLES, SOFT_TARGETS
from pipeline.stages.parquet_schemas import soft_targets_schema
from pipeline.stages.shards import Shards


class Distill(Stage):
    name = "distill"
    inputs = ("samples",)
    outputs = (SOFT_TARGETS,)
    config_sections = ("teacher", "distill")
    key_metrics = ("teacher_top1_agreement", "bytes_per_token", "topk_mass_mean", "score_tokens_per_s")
    description = "teacher top-k soft targets on the accepted samples (offline KD dataset)"

    def run(self, ctx: StageContext) -> None:
        cfg = ctx.config
        samples = ctx.read_table("samples", SAMPLES).filter(pc.field("accepted"))
        if samples.num_rows == 0:
            raise ValueError(
                "no accepted samples to distill: every sample of `generate` was rejected (see its "
                "rejected.* metrics); loosen generate.accept_threshold or use a stronger teacher"
            )
        rows = samples.select(["sample_id", "task", "question", "completion"]).to_pylist()
        size = cfg.distill.shard_size
        parts = {i: rows[start : start + size] for i, start in enumerate(range(0, len(rows), size))}
        shards = Shards(ctx.resume_dir, SOFT_TARGETS)
        dtype = soft_targets_schema(cfg.distill.logprob_dtype)
        out = ctx.output_dir("soft_targets")
        tokenizer, teacher_id = self.score(ctx, parts, shards, dtype)
        stored_bytes = shards.publish(sorted(parts), out)
        tokenizer.save_pretrained(str(out / "tokenizer"))
        fingerprint = T.tokenizer_fingerprint(tokenizer)
        table = shards.read(sorted(parts))
        positions = sum(sum(m) for m in table["loss_mask"].to_pylist())
        soft = pc.max(pc.list_value_length(table["topk_ids"])).as_py() > 0  # resumed shards count too
        write_json(
            out / "meta.json",
            {
                "tokenizer_fingerprint": fingerprint,
                "teacher_id": teacher_id,
                "teacher_context": cfg.distill.teacher_context,
                "top_k": cfg.distill.top_k,
                "logprob_dtype": cfg.distill.logprob_dtype,
                "soft_targets": soft,
                "samples": table.num_rows,
                "target_positions": positions,
            },
        )
        ctx.set_tags({"moeforge.tokenizer_fingerprint": fingerprint})
        ctx.log_metrics(
            {
                "samples": table.num_rows,
                "target_positions": positions,
                "bytes_per_token": stored_bytes / max(positions, 1),
            }
        )

    def score(self, ctx: StageContext, parts: dict, shards: Shards, schema: pa.Schema):
        """Soft targets for every partition not yet on disk, by whatever route the teacher scores; returns the
        tokenizer of the stored ids and the teacher's id."""
        import ray
        from transformers import AutoTokenizer

        from actors.teacher import ScoreRequest, teacher_pool
        from pipeline.teacher.hf import default_cache_dir, resolve_model_dir

        cfg = ctx.config
        vocabulary = cfg.teacher.vocabulary(cfg.distill.tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(vocabulary, default_cache_dir())))
        masses: list[np.ndarray] = []
        agreement = T.TeacherAgreement()
        tokens, t0 = 0, time.perf_counter()  # t0 restarts once the pool is up: throughput excludes its startup
        todo = shards.missing(sorted(parts))
        requests = [
            (
                i,
                ScoreRequest(
                    [(r["task"], r["question"], r["completion"]) for r in parts[i]],
                    cfg.distill.top_k,
                    cfg.distill.batch_size,
                    cfg.distill.teacher_context,
                ),
            )
            for i in todo
        ]
        teacher_id, sequence_level, retried = None, 0, []
        if requests:
            bar = ctx.progress(total=sum(len(parts[i]) for i in todo), desc="distill")
            with teacher_pool(
                cfg.teacher,
                f"distill-{ctx.run_id[:8]}.teacher",
                scheduling_strategy=ctx.scheduling_strategy,
                for_scoring=True,
                vocabulary=vocabulary,
            ) as pool:
                first = pool.actors[0]
                caps, teacher_id = ray.get([first.capabilities.remote(), first.identity.remote()])
                ctx.set_tags({"distill.scored_by": caps.how if caps.score else f"nothing: {caps.refused}"})
                if not caps.score:
                    self.sequence_level(ctx, parts, todo, shards, schema, tokenizer, caps.refused)
                    sequence_level, requests = sum(len(parts[i]) for i in todo), []
                t0 = time.perf_counter()
                # a partition that failed (a server gone mid-way) is scored again whole: shards are written once
                retry = pool.map_unordered(
                    "score", requests, cfg.distill.max_attempts, on_retry=lambda i, _: retried.append(i)
                )
                for i, result in retry:
                    shards.write(
                        i,
                        pa.Table.from_pylist(
                            [
                                T.row(r["sample_id"], r["task"], seq, start, tg)
                                for r, (seq, start), tg in zip(parts[i], result.sequences, result.targets, strict=True)
                            ],
                            schema=schema,
                        ),
                    )
                    masses += [T.topk_mass(tg) for tg in result.targets if tg is not None]
                    for r, (seq, start), tg in zip(parts[i], result.sequences, result.targets, strict=True):
                        if tg is not None:
                            agreement.add(r["task"], tg, seq[start:])
                    sequence_level += sum(tg is None for tg in result.targets)
                    tokens += result.tokens
                    ctx.record("moeforge_distill_tokens", result.tokens)
                    ctx.record("moeforge_distill_tokens_per_second", tokens / (time.perf_counter() - t0))
                    bar.update(len(parts[i]))
            bar.close()
        metrics: dict[str, float] = {
            "resumed_partitions": len(parts) - len(todo),
            "partitions": len(parts),
            "sequence_level_samples": sequence_level,
            "retried_partitions": len(set(retried)),
        }
        if masses:
            mass = np.concatenate(masses)
            metrics.update(
                topk_mass_mean=float(mass.mean()),
                topk_mass_p5=float(np.percentile(mass, 5)),
                score_tokens_per_s=tokens / (time.perf_counter() - t0),
            )
            metrics.update(agreement.metrics())
        if sequence_level and requests:  # the teacher scored, but not every sample: say how many, and where
            ctx.set_tags(
                {
                    "moeforge.warning": f"{sequence_level} of {sum(len(parts[i]) for i in todo)} samples have no soft "
                    f"targets: the teacher's server tokenised them otherwise than the local tokenizer after the "
                    f"{cfg.distill.teacher_context!r} context; they train on their text alone (sequence-level)"
                }
            )
        ctx.log_metrics(metrics)
        return tokenizer, teacher_id or cfg.teacher.model

    def sequence_level(
        self, ctx: StageContext, parts: dict, todo: list, shards: Shards, schema: pa.Schema, tokenizer, why: str | None
    ) -> None:
        """No logits from this teacher: store the tokenized training text only (plain SFT), and say so."""
        cfg = ctx.config
        warning = (
            f"teacher {cfg.teacher.model!r} ({cfg.teacher.backend}) gives no usable logits ({why}): sequence-level "
            f"distillation (SFT on the accepted completions) with tokenizer "
            f"{cfg.teacher.vocabulary(cfg.distill.tokenizer)!r}"
        )
        ctx.set_tags({"moeforge.warning": warning})
        for i in todo:
            shards.write(
                i,
                pa.Table.from_pylist(
                    [
                        T.row(r["sample_id"], r["task"], *T.encode(tokenizer, r["question"], r["completion"]), None)
                        for r in parts[i]
                    ],
                    schema=schema,
                ),
            )
