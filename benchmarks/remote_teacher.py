"""A teacher behind an OpenAI-compatible server against the same teacher in-process: soft targets and speed.

The server is llama-cpp-python's on the default teacher's shipped GGUF (Q4_1); the local teacher is the `hf`
backend on the same GGUF dequantized to fp32. The training texts are the teacher's own greedy answers to
held-out-style prompts, in the student's conversation (what `distill` scores). Both score the same token
sequences; reported:
- top-1 agreement of the two distributions at every completion position;
- KL(local || server) over the ids both top-k lists hold, each renormalised there (nats/token);
- the share of the server's top-k entries placed on a local id (the rest are strings several ids read as);
- generation throughput, local and remote, on the same prompts (tok/s, samples/s).

What differs: llama.cpp multiplies with the Q4_1 blocks and Q8 activations; the `hf` backend with the dequantized
fp32 weights. Needs `make peers`.

    python benchmarks/remote_teacher.py [--samples 24] [--top-k 20]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from peers import LlamaCppServer, llama_cpp_server, peers_python

from pipeline.config import DataConfig
from pipeline.data.prompts import teacher_messages
from pipeline.data.sources import reasoning_gym_prompts
from pipeline.distill.targets import encode
from pipeline.teacher.hf import DEFAULT_TEACHER, HFTeacher, default_cache_dir, resolve_model_dir
from pipeline.teacher.openai_http import OpenAITeacher


def compare(local, remote) -> dict[str, float]:
    """Top-1 agreement and KL over the shared support, over all positions of all sequences."""
    agree, kls = [], []
    for a, b in zip(local, remote, strict=True):
        if b is None:
            continue
        agree += list(a.topk_ids[:, 0] == b.topk_ids[:, 0])
        for ids_a, lp_a, ids_b, lp_b in zip(a.topk_ids, a.topk_logprobs, b.topk_ids, b.topk_logprobs, strict=True):
            pa = dict(zip(ids_a.tolist(), np.exp(lp_a.astype(np.float64)), strict=True))
            pb = dict(zip(ids_b.tolist(), np.exp(lp_b.astype(np.float64)), strict=True))
            shared = [t for t in pa if pb.get(t, 0) > 0 and pa[t] > 0]
            p = np.array([pa[t] for t in shared])
            q = np.array([pb[t] for t in shared])
            p, q = p / p.sum(), q / q.sum()
            kls.append(float((p * np.log(p / q)).sum()))
    return {"top1_agreement": float(np.mean(agree)), "kl_shared": float(np.mean(kls)), "positions": len(agree)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if peers_python() is None:
        print("llama.cpp peer missing: run `make peers`", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    cache = default_cache_dir()
    local = HFTeacher(resolve_model_dir(DEFAULT_TEACHER, cache))
    prompts = reasoning_gym_prompts(DataConfig(num_train_prompts=args.samples, num_eval_prompts=1))["train"]
    conversations = [teacher_messages(p.task, p.question) for p in prompts]
    with llama_cpp_server(args.threads) as base:
        remote = OpenAITeacher(base, LlamaCppServer.MODEL, vocabulary=str(resolve_model_dir(DEFAULT_TEACHER, cache)))
        caps = remote.capabilities()
        print(f"server capabilities: {caps}")
        speeds = {}
        for name, teacher, batch in (("local", local, 8), ("remote", remote, 1)):
            t0, out = time.perf_counter(), []
            for i in range(0, len(conversations), batch):
                out += teacher.generate(conversations[i : i + batch], args.max_new_tokens)
            seconds = time.perf_counter() - t0
            tokens = sum(g.completion_tokens for g in out)
            speeds[name] = (tokens / seconds, len(out) / seconds)
            print(f"generate {name}: {tokens / seconds:.1f} tok/s, {len(out) / seconds:.2f} samples/s")
            if name == "local":
                completions = [g.text for g in out]
        seqs = [encode(local.tokenizer, p.question, c) for p, c in zip(prompts, completions, strict=True)]
        t0 = time.perf_counter()
        theirs = remote.score([s for s, _ in seqs], [i for _, i in seqs], args.top_k)
        remote_score_s = time.perf_counter() - t0
        ours = [local.score([s], [i], args.top_k)[0] for s, i in seqs]
    figures = compare(ours, theirs)
    unplaced = sum(t is None for t in theirs)
    print(f"{figures['positions']} completion positions over {len(seqs) - unplaced} sequences ({unplaced} unaligned)")
    tokens = sum(len(s) for s, _ in seqs)
    print(
        f"RESULT top1_agreement={figures['top1_agreement']:.3f} kl_shared={figures['kl_shared']:.4f} "
        f"unaligned={unplaced} remote_score_tok_s={tokens / remote_score_s:.0f} "
        f"local_gen_tok_s={speeds['local'][0]:.1f} remote_gen_tok_s={speeds['remote'][0]:.1f} "
        f"local_samples_s={speeds['local'][1]:.2f} remote_samples_s={speeds['remote'][1]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
