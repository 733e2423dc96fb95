"""Decode speed of the student in the engines users run: llama.cpp on its GGUF export against moeforge's own
engine, beside the teacher's GGUF in llama.cpp at the same quantization, at a short and a long context, with the
KV cache bytes per token llama.cpp actually allocates.

Every model runs in this process, on the same threads, through the serving engines' own forward passes
(`TorchRunner`: moeforge, fp32; `LlamaCppRunner`: llama.cpp from the `moeforge[llamacpp]` extra), interleaved
round by round after a warm-up: one prefill of the prompt, then `--new-tokens` greedy decode steps at batch 1,
timed apart. The students are converted from the real default teacher in the standard layout (the only one
llama.cpp runs) at the default point and the cost-target point; decode speed depends on the shapes, not on how
well trained the weights are (`--student DIR` times a trained student at the default point instead).

KV bytes per token: what llama.cpp reports allocating for the context ("llama_kv_cache: size = ..." in its log,
over its cells), against the architecture's figure: (kv_lora_rank + qk_rope_head_dim) per layer
for the student (the latent and the rope key, not decompressed heads), 2 · n_kv_heads · head_dim for the teacher,
in the cache's 2-byte f16.

    .venv/bin/python benchmarks/engine_decode.py [--quant q4_1] [--new-tokens 64] [--long 1536] [--rounds 3]
        [--points default,target] [--student DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import describe, result
from peers import teacher_gguf

from pipeline.model.config import model_preset

POINTS = {"default": {}, "target": dict(n_layers=24, qk_rope_head_dim=8, kv_lora_rank=72, n_activated_experts=8)}
QUESTION = "How many times does the letter r appear in the text: strawberry?"


class KVLog:
    """llama.cpp's log lines while a context is made, for the KV cache size it reports."""

    def __init__(self):
        import llama_cpp

        self.lines: list[str] = []

        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            self.lines.append(text.decode("utf-8", "replace"))

        self._callback = callback  # kept alive while llama.cpp holds it
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def kv_bytes_per_token(self) -> float:
        """The KV cache's size over its cells (llama.cpp rounds the context up to whole blocks of cells)."""
        pattern = r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells"
        sizes = [float(m[1]) * 2**20 / int(m[2]) for line in self.lines if (m := re.search(pattern, line))]
        self.lines.clear()
        return sizes[-1] if sizes else float("nan")


def timed(runner, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode tokens/s) of one greedy run at batch 1 on a fresh slot."""
    slot = runner.allocate()
    try:
        t0 = time.perf_counter()
        logits = runner.prefill([slot], [prompt])
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            logits = runner.decode([slot], [int(logits[0].argmax())])
        t2 = time.perf_counter()
    finally:
        runner.free(slot)
    return t1 - t0, new_tokens / (t2 - t1)


def report(speeds, engines: list[str], points: list[str], kv: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Print the table; return the RESULT figures."""
    figures: dict[str, float] = {}
    for context in ("short", "long"):
        teacher_speed = statistics.median(speeds[("teacher", context)])
        for name in engines:
            s = statistics.median(speeds[(name, context)])
            key = name.replace(" ", "_").replace(".", "")
            figures[f"{key}_{context}_tok_s"] = s
            print(f"{context:>5} {name:<20} {s:7.1f} tok/s  (x{s / teacher_speed:.2f} the teacher's GGUF)")
        for point in points:
            ours = statistics.median(speeds[(f"{point} moeforge", context)])
            llama = statistics.median(speeds[(f"{point} llama.cpp", context)])
            figures[f"{point}_llama_cpp_over_moeforge_{context}"] = llama / ours
            print(f"{context:>5} {point}: llama.cpp / moeforge = {llama / ours:.2f}x")
    for name, (allocated, architecture) in kv.items():
        figures[f"{name}_kv_bytes_per_token"] = allocated
        figures[f"{name}_kv_bytes_per_token_architecture"] = architecture
        print(f"KV cache, {name}: llama.cpp allocates {allocated:.0f} B/token, the architecture {architecture:.0f}")
    return figures


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.prompts import chat_token_ids, student_messages
    from pipeline.export.gguf_file import export_gguf
    from pipeline.model import Transformer
    from pipeline.model.convert import calibrate, convert
    from pipeline.serving.engine import TorchRunner
    from pipeline.serving.llama_cpp_runner import LlamaCppRunner
    from pipeline.teacher.hf import DEFAULT_TEACHER, default_cache_dir, resolve_model_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="q4_1", choices=["f32", "f16", "q8_0", "q4_1"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--long", type=int, default=1536, help="tokens of the long context's prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--points", default="default,target")
    ap.add_argument("--student", default=None, help="a trained standard-layout student for the default point")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    path = str(resolve_model_dir(DEFAULT_TEACHER, default_cache_dir()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    short = chat_token_ids(tokenizer, student_messages(QUESTION))
    filler = tokenizer.encode(" ".join(f"{i} + {i + 1} = {2 * i + 1}." for i in range(400)))
    long = (filler * 2)[: args.long - len(short)] + short
    print(describe())
    print(f"{threads} threads, {args.quant}, prompts of {len(short)} and {len(long)} tokens, {args.new_tokens} new")
    calibration = calibrate(teacher, [short, long[:512]], ffn_sample=256)
    log = KVLog()
    workdir = tempfile.TemporaryDirectory(prefix="moeforge-engine-decode-")  # GGUFs, removed at exit
    work = Path(workdir.name)
    engines: dict[str, object] = {}
    kv: dict[str, tuple[float, float]] = {}  # name: (allocated, architecture) bytes per token
    flops = {"teacher": 2.0 * sum(p.numel() for p in teacher.parameters())}  # tied: the table is the head
    n_ctx = len(long) + args.new_tokens + 8
    engines["teacher"] = LlamaCppRunner(teacher_gguf(), 1, n_ctx, threads)
    shape = teacher.config
    kv["teacher"] = (
        log.kv_bytes_per_token(),
        2 * shape.num_key_value_heads * (shape.hidden_size // shape.num_attention_heads) * shape.num_hidden_layers * 2,
    )
    for point in args.points.split(","):
        if point == "default" and args.student:
            student = Transformer.from_pretrained(args.student).eval()
        else:
            cfg = model_preset("tiny", vocab_size=len(tokenizer), max_seq_len=2048, **POINTS[point])
            student, _ = convert(teacher, cfg, calibration, layout="standard")
        gguf = export_gguf(student.eval(), tokenizer, work / point, args.quant)
        engines[f"{point} llama.cpp"] = LlamaCppRunner(gguf, 1, n_ctx, threads)
        c = student.cfg
        kv[point] = (log.kv_bytes_per_token(), (c.kv_lora_rank + c.qk_rope_head_dim) * c.n_layers * 2)
        # a decoded token's weight FLOPs: 2 per active weight it multiplies (the head, not the embedding lookup)
        flops[point] = 2.0 * (student.num_params()["active"] - student.embed.weight.numel())
        engines[f"{point} moeforge"] = TorchRunner(student, 1, min(n_ctx, c.max_seq_len))
    speeds: dict[tuple[str, str], list[float]] = {}
    for runner in engines.values():  # warm-up
        timed(runner, short, 4)
    for _ in range(args.rounds):
        for context, prompt in (("short", short), ("long", long)):
            for name, runner in engines.items():
                speeds.setdefault((name, context), []).append(timed(runner, prompt, args.new_tokens)[1])
    figures = report(speeds, list(engines), args.points.split(","), kv)
    for name, f in flops.items():
        figures[f"{name}_mflops_per_token"] = f / 1e6
        print(f"weight FLOPs per decoded token, {name}: {f / 1e6:.0f} M")
    workdir.cleanup()
    result(quant=args.quant, threads=threads, **figures)


if __name__ == "__main__":
    main()
