"""Decode and prefill speed of the student (ours, latent cache) against its teacher (transformers, KV cache).

Both models run in this process, in the same dtype, interleaved round by round and warmed up, each with its own
greedy loop over the same prompt: one prefill of the batch, then `--new-tokens` decode steps, timed apart. The
student is converted from the real default teacher (calibrated on a few chat prompts; speed does not depend on how
good the weights are) at each compression point: `default` (the embedded `tiny` student) and `target` (the cost
targets: 24 layers, 4 rope pairs, latent 72, 8 of 20 experts).

Beside each decode figure at batch 1: the model's memory-bandwidth ceiling, the bytes a decode step must read per
token (the active weights and output head; the embedding reads one row) over this machine's measured copy
bandwidth, and the fraction of it reached.

    .venv/bin/python benchmarks/decode.py [--points default,target] [--batches 1,4,16,64] [--new-tokens 32]
        [--dtype float32|auto|bfloat16] [--rounds 3] [--compile-max-batch 16] [--no-peer]

`compiled` is the same student with its decode step compiled (`CompiledDecode`), up to `--compile-max-batch`;
`llama.cpp` the teacher's shipped Q4_1 GGUF in llama-cpp-python (`make peers`), at batch 1: it reads ~4.5-bit
weights where the others read fp32 or bf16, so it shows what quantisation buys, not a same-dtype comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import describe, result
from peers import llama_cpp_decoder

from pipeline.model.config import model_preset
from pipeline.model.decode_timing import Speeds, measure_speeds, student_and_teacher
from pipeline.model.generate import CompiledDecode

POINTS = {"default": {}, "target": dict(n_layers=24, qk_rope_head_dim=8, kv_lora_rank=72, n_activated_experts=8)}
QUESTIONS = [
    "What is 7 + 5?",
    "How many times does the letter r appear in the text: strawberry?",
    "State the final answer to the following arithmetic problem: 3 + 4 - 2 =",
    "What is 19 - 6 + 11?",
]


def copy_bandwidth(mib: int = 512) -> float:
    """Bytes per second this machine copies between two buffers far larger than its caches (read + write)."""
    src = torch.rand(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def decode_bytes_per_token(n_active: int, n_unread_embedding: int, element_size: int) -> int:
    """What one decode step at batch 1 reads: every active weight once, except the embedding table's unread rows
    (the step looks up one)."""
    return (n_active - n_unread_embedding) * element_size


def measure(models, prompt, batches, new_tokens, rounds, max_batch: dict[str, int]) -> dict[int, Speeds]:
    """Per batch size: prefill and decode tokens/s of every model, each up to its `max_batch` (the peer runs at
    the batch size it serves, the compiled step where it is compiled)."""
    out = {}
    for b in batches:
        here = {n: m for n, m in models.items() if b <= max_batch.get(n, b)}
        out[b] = r = measure_speeds(here, prompt, b, new_tokens, rounds=rounds)
        line = " | ".join(
            f"{n} {r.decode[n]:7.1f} (x{r.decode[n] / r.decode['teacher']:.2f})"
            if n != "teacher"
            else f"{n} {r.decode[n]:7.1f}"
            for n in r.decode
        )
        pre = " | ".join(f"{n} {v:7.1f}" for n, v in r.prefill.items())
        print(f"  batch {b:3d}: decode tok/s {line} || prefill tok/s {pre}", flush=True)
    return out


def point_figures(point: str, res: dict[int, Speeds], ceiling_b1: float) -> dict[str, float]:
    """The RESULT figures of one compression point: ratios to the teacher at batch 1 and 16 (`<point>_` prefixed
    but for the default point, which also gives its batch-1 speeds and bandwidth fractions)."""
    prefix = "" if point == "default" else f"{point}_"
    out: dict[str, float] = {}
    if point == "default" and 1 in res:
        d = res[1].decode
        out |= {"student_tok_s_b1": d["student"], "teacher_tok_s_b1": d["teacher"]}
        out |= {
            k: v for k, v in (("compiled_tok_s_b1", d.get("compiled")), ("llama_cpp_tok_s_b1", d.get("llama.cpp"))) if v
        }
    for b in (1, 16):
        for model, name in (("student", "ratio"), ("compiled", "compiled_ratio")):
            if b in res and model in res[b].decode:
                out[f"{prefix}{name}_b{b}"] = res[b].decode[model] / res[b].decode["teacher"]
    if point == "default" and 1 in res:
        out["bandwidth_fraction_b1"] = res[1].decode["student"] / ceiling_b1
        if "compiled" in res[1].decode:
            out["compiled_bandwidth_fraction_b1"] = res[1].decode["compiled"] / ceiling_b1
    return out


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.prompts import chat_token_ids, student_messages
    from pipeline.model.convert import calibrate, convert
    from pipeline.model.precision import resolve_precision
    from pipeline.teacher.hf import DEFAULT_TEACHER, default_cache_dir, resolve_model_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="default,target")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="float32")
    ap.add_argument("--no-peer", action="store_true", help="leave out llama.cpp even where `make peers` built it")
    ap.add_argument(
        "--compile-max-batch",
        type=int,
        default=16,
        help="also time the student's compiled decode step (CompiledDecode) at batches up to this (0: not)",
    )
    args = ap.parse_args()
    precision = resolve_precision(args.dtype, "cpu")
    dtype, batches = precision.dtype, [int(b) for b in args.batches.split(",")]
    path = str(resolve_model_dir(DEFAULT_TEACHER, default_cache_dir()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib = [chat_token_ids(tokenizer, student_messages(q)) for q in QUESTIONS]
    prompt = calib[1]
    bandwidth = copy_bandwidth()
    print(describe())
    print(
        f"{precision.name} ({precision.reason}), prompt {len(prompt)} tokens, {args.new_tokens} new tokens, copy "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)"
    )
    calibration = calibrate(teacher, calib, ffn_sample=256)
    # a tied head is one tensor with the embedding (counted once by parameters()) but read in full every step
    teacher_params = sum(p.numel() for p in teacher.parameters())
    teacher_params += teacher.lm_head.weight.numel() * bool(teacher.config.tie_word_embeddings)
    teacher_bytes = decode_bytes_per_token(
        teacher_params,
        teacher.get_input_embeddings().weight.numel() - teacher.config.hidden_size,
        torch.finfo(dtype).bits // 8,
    )
    peer = None if args.no_peer else llama_cpp_decoder(torch.get_num_threads())
    absent = "not run (--no-peer)" if args.no_peer else "not run (not built: make peers)"
    print(f"llama.cpp peer: {peer.describe() if peer else absent}")
    figures: dict[str, float] = {}
    try:
        for point in args.points.split(","):
            cfg = model_preset("tiny", vocab_size=len(tokenizer), **POINTS[point])
            student, _ = convert(teacher.to(torch.float32), cfg, calibration)
            student = student.eval().to(dtype)
            teacher.to(dtype)
            n = student.num_params()
            student_bytes = decode_bytes_per_token(
                n["active"], student.embed.weight.numel() - student.cfg.dim, torch.finfo(dtype).bits // 8
            )
            print(
                f"{point}: {n['active'] / 1e6:.1f}M active parameters; per decoded token the student reads "
                f"{student_bytes / 1e6:.0f} MB, the teacher {teacher_bytes / 1e6:.0f} MB"
            )
            models = student_and_teacher(student, teacher)
            max_batch = {"llama.cpp": 1, "compiled": args.compile_max_batch}
            if args.compile_max_batch:
                compiled = CompiledDecode(student, args.compile_max_batch)
                models["compiled"] = student_and_teacher(student, None, compiled)["student"]
            if peer is not None and point == "default":
                models["llama.cpp"] = peer.loops
            res = measure(models, prompt, batches, args.new_tokens, args.rounds, max_batch)
            if 1 in res:
                ceiling = bandwidth / student_bytes
                print(
                    f"  batch 1 bandwidth ceiling: student {ceiling:.1f} tok/s (reached "
                    f"{res[1].decode['student'] / ceiling:.0%}), teacher {bandwidth / teacher_bytes:.1f} tok/s "
                    f"(reached {res[1].decode['teacher'] / (bandwidth / teacher_bytes):.0%})"
                )
            figures |= point_figures(point, res, bandwidth / student_bytes)
    finally:
        if peer is not None:
            peer.close()
    result(dtype=precision.name, **figures)


if __name__ == "__main__":
    main()
