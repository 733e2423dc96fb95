"""Stage `train`: distil the soft targets into the MoE student on Ray Train, and log it as an MLflow model.

Each `TorchTrainer` worker reads its own rows of the soft-target Parquet shards (every row to exactly one worker,
`pipeline/train/parquet_rows.py`) and is one data-parallel rank over gloo (CPU) or NCCL (GPU): a DDP replica, or
with `train.parallelism=fsdp` an FSDP2 shard of the student. The Train run is
named after the stage's cache key and stored under `train.storage_path` (default `<workdir>/checkpoints`): a worker
that dies restarts its group from the latest checkpoint (`train.max_failures` times), and a pipeline rerun after a
driver crash continues from it instead of step 0. The student is built with the soft targets' own tokenizer (its
vocabulary is the teacher's) from `convert`'s initial student, saved with it as the `trained_student` artifact, and
logged on this run as a pyfunc model: `register` puts it in the Model Registry when `refine` is off (else refine's).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import local_path
from pipeline.stage import Stage, StageContext
from pipeline.stages.artifact_specs import TRAINED_STUDENT


class Train(Stage):
    name = "train"
    inputs = ("soft_targets", "initial_student")
    outputs = (TRAINED_STUDENT,)
    config_sections = ("model", "train")
    key_metrics = ("loss", "tokens_per_s", "mfu")
    description = "distil the soft targets into the MoE student on Ray Train (DDP or FSDP, checkpointed)"

    def run(self, ctx: StageContext) -> None:
        from transformers import AutoTokenizer

        from actors.trainer import fit
        from pipeline.distill.targets import check_tokenizer
        from pipeline.model import Transformer
        from pipeline.stages.parquet_schemas import read_meta
        from pipeline.student.registry import log_student
        from pipeline.train.checkpoint import final_weights
        from pipeline.train.loop import return_large_frees_to_the_os
        from pipeline.train.replica import TrainJob

        return_large_frees_to_the_os()  # the student's tensors go back to the OS when this process drops them
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

        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        data = training_input(source, storage, run_name, nodes)
        ctx.set_tags({"moeforge.train.input": data, "moeforge.train.parallelism": cfg.train.parallelism})
        job = TrainJob(
            model.cfg,
            cfg.train,
            meta["top_k"],
            ctx.run_id,
            ctx.call.tracking_uri,
            parent_run_id=ctx.call.parent_run_id,
            # on one node the workers read the initial student's file; on several, a copy in the object store
            initial_state=str(ctx.input_path("initial_student")) if nodes == 1 else ray.put(model.state_dict()),
            data=data,
        )
        del model  # this process holds no student while the workers train (0.6 GB at the default size)
        result = fit(job, run_name, storage)
        if result.error is not None:
            raise RuntimeError(f"training failed after {cfg.train.max_failures} restart(s): {result.error}")
        if result.checkpoint is None:
            raise RuntimeError(f"training run {run_name} under {storage} ended without a checkpoint")
        model = Transformer.from_pretrained(ctx.input_path("initial_student"))
        with result.checkpoint.as_directory() as d:
            model.load_state_dict(final_weights(Path(d)))
        out = ctx.output_dir("trained_student")
        model.save_pretrained(out, tokenizer)
        info = log_student(out, ctx.run_id, ctx.call.tracking_uri)
        ctx.set_tags({"moeforge.model_uri": info.model_uri, "moeforge.train.checkpoint": result.checkpoint.path})


def training_input(source: Path, storage: str, run_name: str, nodes: int) -> str:
    """Where the workers read the soft-target shards. On a one-node cluster, in place. Otherwise the stage's copy
    is on this node only, so it is copied once beside the checkpoints (`<storage>/<run_name>/soft_targets`), which
    every worker reaches (Ray Train asks the same of `train.storage_path`: an s3:// bucket, or a folder every node
    mounts): file by file and streamed, so no node gathers them; a `_COPIED` marker makes a rerun reuse it, and a
    copy cut short is redone whole."""
    import pyarrow.fs as pafs

    if nodes == 1:
        return str(source)
    target = storage.rstrip("/") + f"/{run_name}/soft_targets"
    local = local_path(target)
    fs, base = (pafs.LocalFileSystem(), str(local.resolve())) if local else pafs.FileSystem.from_uri(target)
    done = base + "/_COPIED"
    if fs.get_file_info(done).type == pafs.FileType.NotFound:
        pafs.copy_files(str(source), base, destination_filesystem=fs)
        with fs.open_output_stream(done) as f:
            f.write(b"complete\n")
    return str(local.resolve()) if local else target
