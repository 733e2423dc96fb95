"""Sharded training (FSDP2) against DDP, and a training input larger than Ray's object store, through
`actors.trainer.fit` (the `train` stage's Ray Train path) on this machine's CPUs over gloo.

Part `memory`, for each of two students (`converted`: the tiny run's converted shape, dim 576, 30 layers, 20 routed
experts of width 64, vocabulary 49,152, random weights; `experts64`: the same with 64 routed experts, so most of its
parameters are experts', as in the large MoE students FSDP is for): the same synthetic soft targets and seeds, 2
Ray Train workers of 1 core each, 20 steps, once with `train.parallelism=ddp` and once with `fsdp`. Reported per
worker, from the figures every rank logs at the end of training: peak RSS, and the bytes of parameters, gradients
and AdamW state it holds; tokens/s (median of steps 4-20, both workers' tokens); and the largest difference between
the two loss curves, step by step.

Part `input`: Ray started with an object store of `--object-store-mb`; soft targets of `--input-ratio` times that
(Arrow bytes, as they would be held if materialized) written as Parquet shards by a separate process; a small
student trained on them with 2 workers past one whole epoch. Reported: the driver's RSS sampled through the run
against before it, each worker's peak RSS, the Arrow bytes of the input, and the rows each worker trained on in
epoch 0 against the rows in the shards (every training row once).

    .venv/bin/python benchmarks/train_sharded.py [--parts memory input] [--students converted experts64]
        [--object-store-mb 100 --input-ratio 10]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import describe, result  # also puts the checkout on sys.path
from train_workers import VOCAB, K, synthetic_rows, write_shards

from actors.trainer import fit
from pipeline.config import TrainConfig
from pipeline.distill import targets as T
from pipeline.model import Transformer
from pipeline.model.config import model_preset
from pipeline.stages.parquet_schemas import soft_targets_schema
from pipeline.train.replica import TrainJob
from pipeline.train.split import is_held_out


def rank_figures(client, run_id: str, name: str, world: int) -> list[float]:
    metrics = client.get_run(run_id).data.metrics
    return [metrics[f"{name}.rank{r}"] for r in range(world)]


def history(client, run_id: str, name: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]


# ---------------------------------------------------------------------------------------------------- memory


STUDENTS = {  # the tiny run's converted shape, and the same with 64 routed experts: parameters mostly experts'
    "converted": dict(vocab_size=VOCAB, dim=576, init="scratch"),
    "experts64": dict(vocab_size=VOCAB, dim=576, init="scratch", n_routed_experts=64),
}


def part_memory(tmp: str, steps: int, student: str) -> dict:
    from mlflow import MlflowClient

    model = model_preset("tiny", **STUDENTS[student])
    sizes = Transformer(model).num_params()
    data = write_shards(pa.Table.from_pylist(synthetic_rows(96), schema=soft_targets_schema("float16")), f"{tmp}/st")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sharded", f"{tmp}/artifacts")
    runs = {}
    for parallelism in ("ddp", "fsdp"):
        run_id = client.create_run(experiment).info.run_id
        train = TrainConfig(
            num_workers=2,
            parallelism=parallelism,
            cpus_per_worker=1,
            max_steps=steps,
            warmup_steps=1,
            batch_size=2,
            micro_batch_size=None,
            seq_len=128,
            checkpoint_every=steps,
            eval_every=steps,
        )
        t0 = time.perf_counter()
        out = fit(TrainJob(model, train, K, run_id, uri, data=data), f"mem-{parallelism}", f"{tmp}/ckpt")
        if out.error is not None:
            raise RuntimeError(f"{parallelism}: {out.error}")
        runs[parallelism] = run_id
        rss = rank_figures(client, run_id, "peak_rss_bytes", 2)
        held = {k: rank_figures(client, run_id, k, 2) for k in ("param_bytes", "grad_bytes", "optimizer_bytes")}
        tok_s = statistics.median(history(client, run_id, "tokens_per_s")[3:])
        print(
            f"{parallelism}: peak RSS per worker {[f'{b / 2**20:.0f} MiB' for b in rss]}, "
            + ", ".join(f"{k} {[f'{b / 2**20:.0f} MiB' for b in v]}" for k, v in held.items())
            + f"; {tok_s:.0f} tokens/s; {time.perf_counter() - t0:.0f} s"
        )
        runs[parallelism] = {"run": run_id, "rss": max(rss), "tok_s": tok_s, **{k: max(v) for k, v in held.items()}}
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    a, b = np.array(history(client, ddp["run"], "loss")), np.array(history(client, fsdp["run"], "loss"))
    print(f"loss, ddp : {np.round(a, 4).tolist()}\nloss, fsdp: {np.round(b, 4).tolist()}")
    print(
        f"student {student}: {sizes['total'] / 1e6:.1f}M parameters; 2 workers x 1 core, batch 2 x 128 per worker, "
        f"{steps} steps"
    )
    figures = {
        "params_m": sizes["total"] / 1e6,
        "rss_ratio_fsdp_vs_ddp": fsdp["rss"] / ddp["rss"],
        "ddp_peak_rss_mib": ddp["rss"] / 2**20,
        "fsdp_peak_rss_mib": fsdp["rss"] / 2**20,
        "state_ratio_fsdp_vs_ddp": sum(fsdp[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes"))
        / sum(ddp[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes")),
        "tok_s_ratio_fsdp_vs_ddp": fsdp["tok_s"] / ddp["tok_s"],
        "ddp_tok_s": ddp["tok_s"],
        "fsdp_tok_s": fsdp["tok_s"],
        "loss_steps": len(a),
        "loss_max_rel_diff": float(np.max(np.abs(a - b) / np.abs(a))),
    }
    return {f"{student}_{k}": v for k, v in figures.items()}


# ---------------------------------------------------------------------------------------------------- input

SMALL_VOCAB, WIDE_K, ROW_LEN, PROMPT_LEN = 512, 64, 128, 32


def nested(values: np.ndarray) -> pa.Array:
    """A (n, a[, b]) array as Arrow list<…> columns without Python objects."""
    n, a = values.shape[:2]
    if values.ndim == 2:
        return pa.ListArray.from_arrays(np.arange(0, n * a + 1, a, dtype=np.int32), pa.array(values.ravel()))
    inner = nested(values.reshape(n * a, values.shape[2]))
    return pa.ListArray.from_arrays(np.arange(0, n * a + 1, a, dtype=np.int32), inner)


def synthetic_shard(first: int, rows: int, seed: int) -> pa.Table:
    """`rows` soft-target rows of fixed length, random tokens over a small vocabulary and a wide top-k (many bytes per
    token: a large input trains fast)."""
    rng = np.random.default_rng(seed)
    mask = np.array(T.loss_mask(ROW_LEN, PROMPT_LEN), dtype=bool)
    positions = int(mask.sum())
    lps = np.sort(np.log(rng.dirichlet(np.ones(WIDE_K + 1), (rows, positions))[..., :WIDE_K]), axis=-1)[..., ::-1]
    columns = {
        "sample_id": pa.array([f"s{i:08d}" for i in range(first, first + rows)]),
        "task": pa.array(["synthetic"] * rows),
        "token_ids": nested(rng.integers(0, SMALL_VOCAB, (rows, ROW_LEN), dtype=np.int32)),
        "loss_mask": nested(np.broadcast_to(mask, (rows, ROW_LEN)).copy()),
        "topk_ids": nested(rng.integers(0, SMALL_VOCAB, (rows, positions, WIDE_K), dtype=np.int32)),
        "topk_logprobs": nested(np.ascontiguousarray(lps).astype(np.float16)),
        "tail_logmass": nested(np.log1p(-np.exp(lps).sum(-1).clip(max=0.999)).astype(np.float32)),
    }
    return pa.Table.from_pydict(columns, schema=soft_targets_schema("float16"))


def write_large_input(folder: str, target_bytes: int, rows_per_file: int = 1024) -> tuple[int, int]:
    """Shards under `folder` until their Arrow bytes reach `target_bytes` (run in its own process). Returns (rows,
    Arrow bytes)."""
    Path(folder).mkdir(parents=True)
    rows = nbytes = 0
    while nbytes < target_bytes:
        table = synthetic_shard(rows, rows_per_file, seed=rows)
        pq.write_table(table, f"{folder}/part-{rows // rows_per_file:05d}.parquet", row_group_size=128)
        rows, nbytes = rows + table.num_rows, nbytes + table.nbytes
    return rows, nbytes


def _write_in_child(folder: str, target_bytes: int, out) -> None:
    out.send(write_large_input(folder, target_bytes))


class RssSampler(threading.Thread):
    """This process's resident memory, sampled every 0.2 s."""

    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.process, self.samples, self.running = psutil.Process(), [], True

    def run(self) -> None:
        while self.running:
            self.samples.append(self.process.memory_info().rss)
            time.sleep(0.2)


def part_input(tmp: str, object_store_mb: int, ratio: float) -> dict:
    from mlflow import MlflowClient

    target = int(ratio * object_store_mb * 2**20)
    parent, child = multiprocessing.get_context("spawn").Pipe()
    writer = multiprocessing.get_context("spawn").Process(target=_write_in_child, args=(f"{tmp}/big", target, child))
    writer.start()
    rows, nbytes = parent.recv()
    writer.join()
    train = TrainConfig(
        num_workers=2,
        cpus_per_worker=1,
        batch_size=16,
        micro_batch_size=None,
        seq_len=256,
        warmup_steps=1,
        max_steps=1,
        eval_every=10**6,
    )
    trained = [i for i in range(rows) if not is_held_out(f"s{i:08d}", train.val_fraction, train.seed)]
    windows_per_rank = len(trained) * ROW_LEN / train.seq_len / 2
    steps = int(windows_per_rank / train.batch_size * 1.02) + 2  # one epoch, a little over
    train = train.model_copy(update={"max_steps": steps, "checkpoint_every": steps})
    # a few-kilobyte student: this part measures the input path's memory, not the model's
    model = model_preset(
        "toy", vocab_size=SMALL_VOCAB, dim=32, n_layers=2, n_heads=2, inter_dim=64, max_seq_len=256,
        moe_inter_dim=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
    )  # fmt: skip
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("input", f"{tmp}/artifacts")).info.run_id
    sampler = RssSampler()
    before = sampler.process.memory_info().rss
    sampler.start()
    t0 = time.perf_counter()
    out = fit(TrainJob(model, train, WIDE_K, run_id, uri, data=f"{tmp}/big"), "input", f"{tmp}/ckpt")
    seconds = time.perf_counter() - t0
    sampler.running = False
    sampler.join()
    if out.error is not None:
        raise RuntimeError(str(out.error))
    epoch0 = rank_figures(client, run_id, "rows_epoch0", 2)
    workers = rank_figures(client, run_id, "peak_rss_bytes", 2)
    print(
        f"input: {rows} rows, {nbytes / 2**20:.0f} MiB as Arrow ({nbytes / (object_store_mb * 2**20):.1f}x the "
        f"{object_store_mb} MiB object store), {len(trained)} of them trained on; {steps} steps in {seconds:.0f} s"
    )
    print(
        f"driver RSS {before / 2**20:.0f} MiB before fit, at most {max(sampler.samples) / 2**20:.0f} MiB during it; "
        f"workers' peak RSS {[f'{b / 2**20:.0f} MiB' for b in workers]}; rows trained in epoch 0 per worker {epoch0}"
    )
    return {
        "input_vs_object_store": nbytes / (object_store_mb * 2**20),
        "input_mib": nbytes / 2**20,
        "driver_rss_before_mib": before / 2**20,
        "driver_rss_peak_mib": max(sampler.samples) / 2**20,
        "worker_peak_rss_mib": max(workers) / 2**20,
        "epoch0_rows_trained": sum(epoch0),
        "epoch0_rows_expected": len(trained),
        "input_minutes": seconds / 60,
    }


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=("memory", "input"), default=["memory", "input"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--students", nargs="+", choices=tuple(STUDENTS), default=list(STUDENTS))
    ap.add_argument("--object-store-mb", type=int, default=100)
    ap.add_argument("--input-ratio", type=float, default=10.0)
    args = ap.parse_args()
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "memory" in args.parts:
            ray.init(num_cpus=2, log_to_driver=False)
            try:
                for student in args.students:
                    figures.update(part_memory(f"{tmp}/memory-{student}", args.steps, student))
            finally:
                ray.shutdown()
        if "input" in args.parts:
            ray.init(num_cpus=2, object_store_memory=args.object_store_mb * 2**20, log_to_driver=False)
            try:
                figures.update(part_input(f"{tmp}/input", args.object_store_mb, args.input_ratio))
            finally:
                ray.shutdown()
    print(describe())
    result(**figures)


if __name__ == "__main__":
    main()
