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
        [--dtype float32|bfloat16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import describe, interleaved, result

from pipeline.model.config import model_preset

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


def student_loops(student, prompt: list[int], batch: int, new_tokens: int):
    """(prefill, decode) callables of our greedy loop; decode continues the latest prefill."""
    from pipeline.model.generate import decode, prefill

    state: dict = {}

    def run_prefill() -> None:
        cache = student.new_cache(batch, max_len=len(prompt) + new_tokens + 1)
        slots = [cache.allocate() for _ in range(batch)]
        state.update(cache=cache, slots=slots, logits=prefill(student, cache, slots, [prompt] * batch))

    def run_decode() -> None:
        logits = state["logits"]
        for _ in range(new_tokens):
            logits = decode(student, state["cache"], state["slots"], logits.argmax(-1).tolist())

    return run_prefill, run_decode


def teacher_loops(teacher, prompt: list[int], batch: int, new_tokens: int):
    """(prefill, decode) callables of the same greedy loop on transformers' forward with its KV cache."""
    state: dict = {}
    ids = torch.tensor([prompt] * batch)

    @torch.no_grad()
    def run_prefill() -> None:
        out = teacher(input_ids=ids, use_cache=True)
        state.update(past=out.past_key_values, logits=out.logits[:, -1], length=ids.shape[1])

    @torch.no_grad()
    def run_decode() -> None:
        past, logits, length = state["past"], state["logits"], state["length"]
        for _ in range(new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            pos = torch.full((batch, 1), length)
            out = teacher(input_ids=nxt, past_key_values=past, position_ids=pos, use_cache=True)
            past, logits, length = out.past_key_values, out.logits[:, -1], length + 1

    return run_prefill, run_decode


def decode_bytes_per_token(n_active: int, n_unread_embedding: int, element_size: int) -> int:
    """What one decode step at batch 1 reads: every active weight once, except the embedding table's unread rows
    (the step looks up one)."""
    return (n_active - n_unread_embedding) * element_size


def measure(student, teacher, prompt, batches, new_tokens, rounds) -> dict[int, dict[str, float]]:
    """Per batch size: prefill tokens/s and decode tokens/s of both models."""
    out = {}
    for b in batches:
        sp, sd = student_loops(student, prompt, b, new_tokens)
        tp, td = teacher_loops(teacher, prompt, b, new_tokens)
        pre = interleaved({"student": sp, "teacher": tp}, rounds=rounds, warmup=1)
        # decode timing includes nothing but the steps: each is set up by an untimed prefill
        dec = interleaved({"student": sd, "teacher": td}, rounds=rounds, warmup=1, setup={"student": sp, "teacher": tp})
        out[b] = {
            "student_prefill": b * len(prompt) / pre["student"],
            "teacher_prefill": b * len(prompt) / pre["teacher"],
            "student_decode": b * new_tokens / dec["student"],
            "teacher_decode": b * new_tokens / dec["teacher"],
        }
        r = out[b]
        print(
            f"  batch {b:3d}: decode tok/s student {r['student_decode']:7.1f} teacher {r['teacher_decode']:7.1f} "
            f"(x{r['student_decode'] / r['teacher_decode']:.2f}) | prefill tok/s student "
            f"{r['student_prefill']:7.1f} teacher {r['teacher_prefill']:7.1f} "
            f"(x{r['student_prefill'] / r['teacher_prefill']:.2f})",
            flush=True,
        )
    return out


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.prompts import chat_token_ids, student_messages
    from pipeline.model.convert import calibrate, convert
    from pipeline.teacher.hf import DEFAULT_TEACHER, default_cache_dir, resolve_model_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="default,target")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    dtype, batches = getattr(torch, args.dtype), [int(b) for b in args.batches.split(",")]
    path = str(resolve_model_dir(DEFAULT_TEACHER, default_cache_dir()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib = [chat_token_ids(tokenizer, student_messages(q)) for q in QUESTIONS]
    prompt = calib[1]
    bandwidth = copy_bandwidth()
    print(describe())
    print(
        f"{args.dtype}, prompt {len(prompt)} tokens, {args.new_tokens} new tokens, copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (read + write)"
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
    figures: dict[str, float] = {}
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
        res = measure(student, teacher, prompt, batches, args.new_tokens, args.rounds)
        ceiling = bandwidth / student_bytes
        fraction = res[1]["student_decode"] / ceiling if 1 in res else float("nan")
        if 1 in res:
            teacher_fraction = res[1]["teacher_decode"] / (bandwidth / teacher_bytes)
            print(
                f"  batch 1 bandwidth ceiling: student {ceiling:.1f} tok/s (reached {fraction:.0%}), teacher "
                f"{bandwidth / teacher_bytes:.1f} tok/s (reached {teacher_fraction:.0%})"
            )
        prefix = "" if point == "default" else f"{point}_"
        for b in (1, 16):
            if b in res:
                figures[f"{prefix}ratio_b{b}"] = res[b]["student_decode"] / res[b]["teacher_decode"]
        if point == "default" and 1 in res:
            figures = {
                "student_tok_s_b1": res[1]["student_decode"],
                "teacher_tok_s_b1": res[1]["teacher_decode"],
                **figures,
                "bandwidth_fraction_b1": fraction,
            }
    result(**figures)


if __name__ == "__main__":
    main()
