"""Generation throughput: the `generate` stage's teacher actor pool against a plain one-prompt-at-a-time loop.

Peer: `model.generate` called on one prompt at a time (greedy, the same teacher, prompts and max_new_tokens),
with torch using every core of the process. Ours: the real `generate` stage (Ray actor pool, batched left-padded
generation), run through the pipeline runner on a fresh local store; its `tokens_per_s` counts completion tokens
from the moment the pool is up to the last shard. Both count only real completion tokens (up to end-of-sequence).
The acceptance rate is the stage's own, on the default task mixture.

    python benchmarks/generate.py [--prompts 64] [--set teacher.num_actors=2 ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import describe, result

from pipeline.config import load_config
from pipeline.data.prompts import teacher_messages
from pipeline.data.sources import load_prompts


def sequential_tokens_per_s(cfg, prompts) -> tuple[float, int]:
    import torch

    from pipeline.teacher.hf import HFTeacher, default_cache_dir, resolve_model_dir

    teacher = HFTeacher(resolve_model_dir(cfg.teacher.model, default_cache_dir()))
    tok, model = teacher.tokenizer, teacher.model
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([teacher.encode_chat(teacher_messages(p.task, p.question, cfg.data.prompt_style))])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=cfg.teacher.max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
            row = out[0, ids.shape[1] :].tolist()
            tokens += row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
    return tokens / (time.perf_counter() - t0), tokens


def pool_metrics(cfg) -> dict[str, float]:
    from mlflow import MlflowClient

    from pipeline.runner import run_pipeline
    from pipeline.stages.generate import Generate

    res = run_pipeline(cfg, [Generate()])
    return MlflowClient(res.tracking_uri).get_run(res["generate"].run_id).data.metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        cfg = load_config("tiny", [f"data.num_train_prompts={args.prompts}", f"tracking.workdir={workdir}", *args.set])
        prompts = load_prompts(cfg.data)["train"]
        print(describe())
        print(
            f"{len(prompts)} prompts, max_new_tokens {cfg.teacher.max_new_tokens}, {cfg.teacher.num_actors} "
            f"actors x {cfg.teacher.num_cpus_per_actor} CPU, batch {cfg.teacher.batch_size}"
        )
        seq, seq_tokens = sequential_tokens_per_s(cfg, prompts)
        print(f"sequential loop: {seq:.1f} tok/s ({seq_tokens} tokens)")
        m = pool_metrics(cfg)
        print(
            f"actor pool: {m['tokens_per_s']:.1f} tok/s, {m['samples_per_s']:.2f} samples/s, acceptance "
            f"{m['acceptance_rate']:.3f} "
            + " ".join(f"{k.split('.', 1)[1]}={v:.2f}" for k, v in m.items() if k.startswith("acceptance_rate."))
        )
    result(
        speedup_vs_sequential=m["tokens_per_s"] / seq,
        acceptance_rate=m["acceptance_rate"],
        pool_tokens_per_s=m["tokens_per_s"],
        sequential_tokens_per_s=seq,
    )


if __name__ == "__main__":
    main()
