"""Training throughput with the streamed input (issue 19) against the in-memory input it replaced, on the tiny
preset's training settings.

Peer: the input as it was before streaming: every row of the replica's shard in a Python list, packed into windows
once up front, each epoch a seeded permutation of all windows, batches cut by indexing. Ours: the product's
`WindowStream` fed the way a Ray Train worker feeds it (Arrow record batches of a few hundred rows, converted as
they come: what `parquet_rows.RankRows` reads from a row group), packing on the fly through the default 64 MB
shuffle buffer. Both feed identical replicas (the tiny student, `train` section of the tiny preset: batch 8 x 256
tokens, one worker, both cores), whose whole training step (input, forward, backward, AdamW, router-bias update) is
timed, interleaved round by round. Synthetic soft-target rows shaped like the distilled dataset
(`train_workers.synthetic_rows`).

    .venv/bin/python benchmarks/train_input.py [--rows 512 --rounds 12 --buffer-mb 2]
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import torch
from _common import describe, interleaved, result
from train_workers import VOCAB, K, synthetic_rows

from pipeline.config import load_config
from pipeline.model.config import model_preset
from pipeline.stages.parquet_schemas import soft_targets_schema
from pipeline.train.packing import PackedBatch, pack
from pipeline.train.replica import Replica, TrainJob


class InMemoryInput:
    """The replaced input path: all rows packed once, a seeded permutation of every window per epoch."""

    def __init__(self, rows: list[dict], seq_len: int, k: int, seed: int = 0):
        self.windows, self.seed = pack(rows, seq_len, k), seed
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.windows.tokens_BT))

    def next_batch(self, size: int) -> PackedBatch:
        order, take = self._order(), []
        while len(take) < size:
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            take.append(order[self.position])
            self.position += 1
        return PackedBatch(*(getattr(self.windows, f)[take] for f in vars(self.windows)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--buffer-mb", type=float, default=None, help="train.input_buffer_mb (default: the preset's)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    train = load_config("tiny").train.model_copy(update={"num_workers": 1, "warmup_steps": 1, "max_steps": 10_000})
    if args.buffer_mb:
        train = train.model_copy(update={"input_buffer_mb": args.buffer_mb})
    job = TrainJob(model_preset("toy", vocab_size=VOCAB), train, K)
    table = pa.Table.from_pylist(synthetic_rows(args.rows), schema=soft_targets_schema("float16"))

    def arrow_rows(epoch: int):  # what RankRows does with a row group: a few hundred rows at a time
        for batch in table.to_batches(max_chunksize=256):
            yield from batch.to_pylist()

    ours = Replica(job, arrow_rows)
    peer = Replica(job, table.to_pylist())
    peer.data = peer.state.data = InMemoryInput(table.to_pylist(), train.seq_len, K, train.seed)
    sec = interleaved({"in_memory": peer.train_step, "streamed": ours.train_step}, rounds=args.rounds, warmup=2)
    tokens = train.batch_size * train.seq_len
    for name, s in sec.items():
        print(f"{name:>10}: {s:.3f} s per step, {tokens / s:6.0f} tokens/s")
    print(
        f"tiny preset, batch {train.batch_size} x {train.seq_len}, {args.rows} rows; streamed input buffer "
        f"{ours.data.capacity} windows (peak {ours.data.peak_buffered}); {describe()}"
    )
    result(
        streamed_vs_in_memory=sec["in_memory"] / sec["streamed"],
        streamed_tok_s=tokens / sec["streamed"],
        in_memory_tok_s=tokens / sec["in_memory"],
    )


if __name__ == "__main__":
    main()
