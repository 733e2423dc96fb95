"""Training throughput with 1 vs 2 Ray Train workers on this machine (same data, same model, same global work).

The tiny student (vocabulary 49,152) trains on synthetic soft targets shaped like the distilled dataset (prompt +
completion rows, top-20 targets at completion positions) through `actors.trainer.fit`, the code path of the
`train` stage: each worker reading its own rows of the Parquet shards, TorchTrainer, DDP over gloo, checkpoints.
The machine's cores are shared out the
same way in both runs (1 worker x 2 threads vs 2 workers x 1 thread) and each worker takes the same batch, so
the 2-worker run does twice the work per step. tokens/s is the median of the rank-0 step metric (all workers'
tokens over the step's wall time) after the first 3 steps.

    .venv/bin/python benchmarks/train_workers.py [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import describe, result  # also puts the checkout on sys.path

from actors.trainer import fit
from pipeline.config import TrainConfig
from pipeline.distill import targets as T
from pipeline.model.config import model_preset
from pipeline.stages.parquet_schemas import soft_targets_schema
from pipeline.train.replica import TrainJob

VOCAB, K = 49152, 20


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt, completion = int(rng.integers(50, 90)), int(rng.integers(40, 120))
        tokens = rng.integers(0, VOCAB, prompt + completion).tolist()
        mask = T.loss_mask(len(tokens), prompt)
        positions = sum(mask)
        ids = rng.integers(0, VOCAB, (positions, K))
        lps = np.sort(np.log(rng.dirichlet(np.ones(K + 1), positions)[:, :K]), axis=1)[:, ::-1]
        rows.append(
            {
                "sample_id": f"s{i:05d}",
                "task": "synthetic",
                "token_ids": tokens,
                "loss_mask": mask,
                "topk_ids": ids.tolist(),
                "topk_logprobs": lps.tolist(),
                "tail_logmass": np.log1p(-np.exp(lps).sum(1).clip(max=0.999)).tolist(),
            }
        )
    return rows


def write_shards(table: pa.Table, folder: str, rows_per_file: int = 4096, row_group_rows: int = 256) -> str:
    """`table` as Parquet shards under `folder`, the layout `distill` writes; returns `folder`."""
    from pathlib import Path

    Path(folder).mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, table.num_rows, rows_per_file)):
        part = table.slice(start, rows_per_file)
        pq.write_table(part, f"{folder}/part-{i:05d}.parquet", row_group_size=row_group_rows)
    return folder


def main() -> None:
    import ray
    from mlflow import MlflowClient

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args()
    ray.init(num_cpus=2, log_to_driver=False)
    table = pa.Table.from_pylist(synthetic_rows(args.rows), schema=soft_targets_schema("float16"))
    model = model_preset("toy", vocab_size=VOCAB)
    speeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shards(table, f"{tmp}/soft_targets")
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(uri)
        exp = client.create_experiment("bench", artifact_location=f"{tmp}/artifacts")
        for workers in (1, 2):
            run_id = client.create_run(exp).info.run_id
            train = TrainConfig(
                num_workers=workers,
                cpus_per_worker=2 / workers,
                max_steps=args.steps,
                warmup_steps=1,
                batch_size=8,
                micro_batch_size=None,
                seq_len=256,
                checkpoint_every=args.steps,
            )
            fit(TrainJob(model, train, K, run_id, uri, data=data), f"w{workers}", f"{tmp}/ckpt")
            history = sorted(client.get_metric_history(run_id, "tokens_per_s"), key=lambda m: m.step)
            speeds[workers] = statistics.median(m.value for m in history[3:])
            mfu = statistics.median(m.value for m in client.get_metric_history(run_id, "mfu"))
            print(
                f"{workers} worker(s): {speeds[workers]:.0f} tokens/s (median of steps 4-{args.steps}), "
                f"MFU {mfu:.3f} of the measured matmul peak"
            )
    print(describe())
    result(speedup_2_vs_1_workers=speeds[2] / speeds[1], tok_s_1_worker=speeds[1], tok_s_2_workers=speeds[2])


if __name__ == "__main__":
    main()
