"""Storage of soft targets: bytes per token of the `distill` format against the full-vocabulary fp16 distribution.

Samples: the default teacher's greedy answers to the tiny mixture's training prompts (as `generate` makes them),
scored by the teacher on the student's training text (as `distill` does), top-k 20, log-probs in float16, written
with the stage's Parquet schema. Peer: the same positions stored densely as fp16 log-probabilities over the whole
vocabulary (49,152 x 2 bytes = 98,304 bytes a token before compression), written to Parquet the same way for a
subset and also reported at its nominal size. Also reports the share of the teacher's probability mass that the top
k covers (mean and 5th percentile over positions).

    python benchmarks/distill_storage.py [--prompts 64] [--top-k 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from _common import describe, result

from pipeline.config import load_config
from pipeline.data.prompts import teacher_messages
from pipeline.data.sources import load_prompts
from pipeline.distill import targets as T
from pipeline.stages.parquet_schemas import soft_targets_schema
from pipeline.teacher.hf import HFTeacher, default_cache_dir, resolve_model_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--dense-samples", type=int, default=8)
    args = ap.parse_args()
    cfg = load_config("tiny", [f"data.num_train_prompts={args.prompts}"])
    teacher = HFTeacher(resolve_model_dir(cfg.teacher.model, default_cache_dir()))
    prompts = load_prompts(cfg.data)["train"]
    gens = []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        gens += teacher.generate([teacher_messages(p.task, p.question) for p in chunk], max_new_tokens=64)
    seqs = [T.encode(teacher.tokenizer, p.question, g.text.strip()) for p, g in zip(prompts, gens, strict=True)]
    rows, masses, dense_rows = [], [], []
    for start in range(0, len(seqs), 8):
        chunk = seqs[start : start + 8]
        scored = teacher.score([s for s, _ in chunk], [i for _, i in chunk], args.top_k)
        for (seq, first), tg in zip(chunk, scored, strict=True):
            rows.append(T.row(f"s{len(rows)}", "x", seq, first, tg))
            masses.append(T.topk_mass(tg))
            if len(dense_rows) < args.dense_samples:
                with torch.no_grad():
                    logits = teacher.model(torch.tensor([seq])).logits[0, first - 1 : len(seq) - 1].float()
                dense_rows.append({"logprobs": torch.log_softmax(logits, -1).half().numpy().tolist()})
    positions = sum(len(r["topk_ids"]) for r in rows)
    dense_positions = sum(len(r["logprobs"]) for r in dense_rows)
    with tempfile.TemporaryDirectory() as tmp:
        ours, dense = Path(tmp) / "ours.parquet", Path(tmp) / "dense.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=soft_targets_schema("float16")), ours)
        dense_schema = pa.schema([("logprobs", pa.list_(pa.list_(pa.float16())))])
        pq.write_table(pa.Table.from_pylist(dense_rows, schema=dense_schema), dense)
        ours_bpt = ours.stat().st_size / positions
        dense_bpt = dense.stat().st_size / dense_positions
    nominal = len(teacher.tokenizer) * 2
    mass = np.concatenate(masses)
    print(describe())
    print(f"{len(rows)} samples, {positions} target positions, top-k {args.top_k}, float16 log-probs")
    print(f"ours: {ours_bpt:.1f} bytes/token (whole rows: token ids, mask, top-k ids + log-probs, tail)")
    print(
        f"dense fp16: {nominal} bytes/token nominal, {dense_bpt:.0f} bytes/token in Parquet "
        f"({dense_positions} positions)"
    )
    print(f"top-{args.top_k} mass: mean {mass.mean():.4f}, p5 {np.percentile(mass, 5):.4f}, min {mass.min():.4f}")
    result(
        bytes_per_token=ours_bpt,
        ratio_vs_dense=nominal / ours_bpt,
        ratio_vs_dense_parquet=dense_bpt / ours_bpt,
        topk_mass=float(mass.mean()),
        topk_mass_p5=float(np.percentile(mass, 5)),
    )


if __name__ == "__main__":
    main()
