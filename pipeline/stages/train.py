"""Stage `train`: distil the soft targets into the MoE student on Ray Train, and log it as an MLflow model.

The soft-target Parquet is read through Ray Data and split per worker (every row to exactly one worker, see
`actors/trainer.py`); each `TorchTrainer` worker is one DDP replica over gloo (CPU) or NCCL (GPU). The Train run is
named after the stage's cache key and stored under `train.storage_path` (default `<workdir>/checkpoints`): a worker
that dies restarts its group from the latest checkpoint (`train.max_failures` times), and a pipeline rerun after a
driver crash continues from it instead of step 0. The student is built with the soft targets' own tokenizer (its
vocabulary is the teacher's) from `convert`'s initial student, saved with it as the `student` artifact, and logged
on this run as a pyfunc model that `register` puts in the Model Registry.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import local_path
from pipeline.stage import Stage, StageContext
from pipeline.stages.artifact_specs import STUDENT


class Train(Stage):
    name = "train"
    inputs = ("soft_targets", "initial_student")
    outputs = (STUDENT,)
    config_sections = ("model", "train")
    key_metrics = ("loss", "tokens_per_s", "mfu")
    description = "distil the soft targets into the MoE student on Ray Train (DDP, checkpointed)"

    def run(self, ctx: StageContext) -> None:
        from transformers import AutoTokenizer

        from actors.trainer import fit
        from pipeline.distill.targets import check_tokenizer
        from pipeline.model import Transformer
        from pipeline.stages.artifact_specs import read_meta
        from pipeline.student.registry import log_student
        from pipeline.train.checkpoint import final_weights
        from pipeline.train.replica import TrainJob

        cfg = ctx.config
        source = ctx.input_path("soft_targets")
        meta = read_meta(source)
        tokenizer = AutoTokenizer.from_pretrained(str(source / "tokenizer"))
        check_tokenizer(tokenizer, meta["tokenizer_fingerprint"], "the soft targets' saved tokenizer")
        model = Transformer.from_pretrained(ctx.input_path("initial_student"))
        if model.cfg.vocab_size != len(tokenizer):
            raise ValueError(
                f"the initial student's vocabulary ({model.cfg.vocab_size}) is not the soft targets' "
                f"tokenizer's ({len(tokenizer)} tokens): convert and distill used different tokenizers"
            )
        sizes = model.num_params()
        ctx.log_metrics({"params_total": sizes["total"], "params_active": sizes["active"]})
        if not meta.get("soft_targets", True):
            ctx.set_tags({"moeforge.warning": "no teacher logits in the soft targets: training is plain SFT (CE)"})

        storage = cfg.train.storage_path or str((ctx.workdir / "checkpoints").resolve())
        run_name = f"train-{ctx.call.key[:16]}"
        ctx.set_tags({"moeforge.train.run_name": run_name, "moeforge.train.storage_path": storage})
        import ray

        from pipeline.train.split import is_held_out

        t = cfg.train
        dataset = read_soft_targets(source)
        val_rows = dataset.filter(lambda r: is_held_out(r["sample_id"], t.val_fraction, t.seed)).take_all()
        train_rows = dataset.filter(lambda r: not is_held_out(r["sample_id"], t.val_fraction, t.seed))
        ctx.log_metrics({"val_samples": len(val_rows)})
        job = TrainJob(
            model.cfg,
            t,
            meta["top_k"],
            ctx.run_id,
            ctx.call.tracking_uri,
            parent_run_id=ctx.call.parent_run_id,
            initial_state=ray.put(model.state_dict()),
            val_rows=[dict(r) for r in val_rows],
        )
        result = fit(job, train_rows, run_name, storage)
        if result.error is not None:
            raise RuntimeError(f"training failed after {cfg.train.max_failures} restart(s): {result.error}")
        if result.checkpoint is None:
            raise RuntimeError(f"training run {run_name} under {storage} ended without a checkpoint")
        with result.checkpoint.as_directory() as d:
            model.load_state_dict(final_weights(Path(d)))
        out = ctx.output_dir("student")
        model.save_pretrained(out, tokenizer)
        info = log_student(out, ctx.run_id, ctx.call.tracking_uri)
        ctx.set_tags({"moeforge.model_uri": info.model_uri, "moeforge.train.checkpoint": result.checkpoint.path})


def read_soft_targets(path: Path):
    """The soft-target Parquet as a Ray Dataset; a folder only this node has is read by tasks on this node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_args = {}
    if local_path(str(path)) is not None:
        node = ray.get_runtime_context().get_node_id()
        remote_args["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    dataset = ray.data.read_parquet(str(path), file_extensions=["parquet"], ray_remote_args=remote_args)
    dataset.context.enable_progress_bars = False  # the stage's progress is the training steps, not this read
    return dataset
