"""Serving throughput and latency: 16 chat requests one at a time and all at once, ours and llama.cpp's server.

A real local Ray Serve app (`actors/server.py`) serves the default student (`--student default`: converted from the
real default teacher, as `make run`'s `convert` builds it; speed does not depend on what the weights learned;
`--student toy`: the 29M scratch student older figures were measured on) with the real tokenizer. The same 16 chat
requests (distinct questions with the student's instruction as system message, greedy, `max_tokens` fixed, no stop
at the end-of-turn token, so every request produces exactly that many tokens) are sent through the official
`openai` client at concurrency 1 (one at a time) and at concurrency 16 (all at once: continuous batching shares each
decode step). Where `make peers` built it, llama-cpp-python's OpenAI-compatible server on the teacher's shipped GGUF
gets the same requests on the same cores (its end-of-turn token masked by `logit_bias`), before our app starts.
Rounds alternate the two concurrencies so drift hits both; medians over rounds. Aggregate output tokens/s counts
the usage the server reported; time to first token (TTFT) and inter-token latency (ITL, the gap between content
chunks) are measured per stream on the client.

The TTFT floor beside it: the seconds the student needs to prefill all 16 prompts in one batch (in this process, on
the replica's thread count, with nothing else running), what the first token of the last of 16 simultaneous
requests cannot beat.

    python benchmarks/serve_load.py [--student default|toy] [--requests 16] [--max-tokens 64] [--rounds 2]
        [--batch 16] [--cpus 2] [--dtype float32|auto|bfloat16] [--compile-max-batch 0] [--no-peer]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from pathlib import Path

from _common import describe, result

QUESTIONS = [
    "What is {a} + {b}?",
    "How many letters are in the word '{w}'?",
    "Add {a}, {b} and {a}.",
    "Is {a} larger than {b}?",
]
WORDS = ["strawberry", "moeforge", "latent", "expert", "router", "teacher", "student", "batch"]


def build_student(directory: Path, kind: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.prompts import chat_token_ids, student_messages
    from pipeline.model import Transformer
    from pipeline.model.config import model_preset
    from pipeline.model.convert import calibrate, convert
    from pipeline.teacher.hf import DEFAULT_TEACHER, default_cache_dir, resolve_model_dir

    path = str(resolve_model_dir(DEFAULT_TEACHER, default_cache_dir()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    if kind == "toy":
        Transformer.for_tokenizer(model_preset("toy"), tokenizer).save_pretrained(directory, tokenizer)
        return
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib = [chat_token_ids(tokenizer, student_messages(messages(i)[1]["content"])) for i in range(4)]
    student, _ = convert(teacher, model_preset("tiny", vocab_size=len(tokenizer)), calibrate(teacher, calib, 256))
    student.save_pretrained(directory, tokenizer)


def prefill_floor(directory: Path, n: int, threads: int, dtype: str) -> float:
    """Median seconds the student takes to prefill the `n` requests' prompts in one batch."""
    import torch
    from _common import interleaved

    from pipeline.data.prompts import chat_token_ids
    from pipeline.model.generate import prefill
    from pipeline.student import Student

    torch.set_num_threads(threads)
    student = Student(directory, "cpu", dtype)
    prompts = [chat_token_ids(student.tokenizer, messages(i)) for i in range(n)]

    def run() -> None:
        cache = student.model.new_cache(n, max_len=max(map(len, prompts)) + 1)
        prefill(student.model, cache, [cache.allocate() for _ in range(n)], prompts)

    return interleaved({"prefill": run}, rounds=5, warmup=1)["prefill"]


def messages(i: int) -> list[dict]:
    from pipeline.data.prompts import student_messages

    q = QUESTIONS[i % len(QUESTIONS)].format(a=7 + 3 * i, b=11 + 5 * i, w=WORDS[i % len(WORDS)])
    return student_messages(q)


async def one(client, model: str, i: int, max_tokens: int, no_stop: dict) -> dict:
    t0 = time.perf_counter()
    stamps, usage = [], None
    stream = await client.chat.completions.create(
        model=model,
        messages=messages(i),
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **no_stop,
    )
    token_chunks = 0  # a server that reports no usage when streaming (llama-cpp-python) sends a chunk a token
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content is not None:
            token_chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return {
        "ttft": stamps[0] - t0,
        "itl": [b - a for a, b in itertools.pairwise(stamps)],
        "tokens": usage.completion_tokens if usage else token_chunks,
        "end": time.perf_counter(),
    }


async def load(base_url: str, model: str, n: int, max_tokens: int, concurrent: bool, no_stop: dict) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        if concurrent:
            runs = await asyncio.gather(*(one(client, model, i, max_tokens, no_stop) for i in range(n)))
        else:
            runs = [await one(client, model, i, max_tokens, no_stop) for i in range(n)]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in runs)
    assert tokens == n * max_tokens, f"expected {n * max_tokens} tokens, the server reported {tokens}"
    return {"tok_s": tokens / wall, "ttft": [r["ttft"] for r in runs], "itl": [x for r in runs for x in r["itl"]]}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e3 if len(values) > 1 else values[0] * 1e3


def rounds_of(base: str, model: str, args, no_stop: dict) -> tuple[list[dict], list[dict]]:
    """(concurrency 1, concurrency n) loads of every round, after a short warm-up."""
    asyncio.run(load(base, model, 2, 8, True, no_stop))  # warm up the proxy and the replica
    seq, par = [], []
    for _ in range(args.rounds):
        seq.append(asyncio.run(load(base, model, args.requests, args.max_tokens, False, no_stop)))
        par.append(asyncio.run(load(base, model, args.requests, args.max_tokens, True, no_stop)))
    return seq, par


def summary(runs: list[dict]) -> dict:
    ttft = [x for r in runs for x in r["ttft"]]
    itl = [x for r in runs for x in r["itl"]]
    return {
        "tok_s": statistics.median(r["tok_s"] for r in runs),
        "p50_ttft": pct(ttft, 50),
        "p99_ttft": pct(ttft, 99),
        "p50_itl": pct(itl, 50),
        "p99_itl": pct(itl, 99),
    }


def serve_student(args, directory: Path) -> tuple[list[dict], list[dict]]:
    import ray
    from ray import serve

    from actors.server import start
    from pipeline.config import ServeConfig

    ray.init(num_cpus=max(2, int(args.cpus)), num_gpus=int(args.gpus + 0.999), include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    settings = ServeConfig(
        max_batch_size=args.batch,
        max_ongoing_requests=max(32, args.requests),
        max_queued_requests=-1,
        num_cpus=args.cpus,
        num_gpus=args.gpus,
        max_tokens_limit=args.max_tokens,
        inference_dtype=args.dtype,
        compile_decode_max_batch=args.compile_max_batch,
    )
    try:
        url = start(settings, str(directory), None)
        return rounds_of(f"{url}/v1", "student", args, {"extra_body": {"ignore_eos": True}})
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", choices=["default", "toy"], default="default")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="serve.max_batch_size (engine slots)")
    parser.add_argument("--cpus", type=float, default=2, help="CPUs of the one replica")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs of the one replica (the student on CUDA)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="float32")
    parser.add_argument("--compile-max-batch", type=int, default=0, help="serve.compile_decode_max_batch")
    parser.add_argument("--no-peer", action="store_true", help="leave out llama.cpp even where `make peers` built it")
    args = parser.parse_args()

    from peers import LlamaCppServer, llama_cpp_server
    from transformers import AutoTokenizer

    threads = max(1, int(args.cpus))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "student"
        build_student(directory, args.student)
        peer = None
        if not args.no_peer:
            with llama_cpp_server(threads) as base:
                if base is not None:
                    eos = AutoTokenizer.from_pretrained(str(directory)).eos_token_id
                    peer = rounds_of(base, LlamaCppServer.MODEL, args, {"logit_bias": {str(eos): -100}})
        ours = serve_student(args, directory)
        floor_ms = prefill_floor(directory, args.requests, threads, args.dtype) * 1e3

    print(
        f"{describe()}; {args.student} student, {args.dtype}, replica CPUs {args.cpus}, GPUs {args.gpus}, engine "
        f"slots {args.batch}; {args.requests} requests x {args.max_tokens} tokens, {args.rounds} rounds"
    )
    print(f"{'':<22}{'tok/s':>8}{'p50 TTFT':>10}{'p99 TTFT':>10}{'p50 ITL':>9}{'p99 ITL':>9}   (ms)")
    table = {"student": ours, **({"llama.cpp (teacher GGUF)": peer} if peer else {})}
    s = {}
    for who, (seq, par) in table.items():
        s[who] = summary(seq), summary(par)
        for name, row in zip(("c=1", f"c={args.requests}"), s[who], strict=True):
            print(
                f"{who[:12] + ' ' + name:<22}{row['tok_s']:>8.1f}{row['p50_ttft']:>10.1f}{row['p99_ttft']:>10.1f}"
                f"{row['p50_itl']:>9.1f}{row['p99_itl']:>9.1f}"
            )
    s1, s16 = s["student"]
    print(f"prefill of all {args.requests} prompts in one batch (the TTFT floor): {floor_ms:.0f} ms")
    figures = {
        "tok_s_c1": s1["tok_s"],
        "tok_s_c16": s16["tok_s"],
        "speedup_c16_vs_c1": s16["tok_s"] / s1["tok_s"],
        "p50_ttft_ms_c1": s1["p50_ttft"],
        "p99_ttft_ms": s16["p99_ttft"],
        "p50_ttft_ms": s16["p50_ttft"],
        "prefill_floor_ms": floor_ms,
        "p99_ttft_over_floor": s16["p99_ttft"] / floor_ms,
        "p50_itl_ms": s16["p50_itl"],
    }
    if peer:
        p1, p16 = s["llama.cpp (teacher GGUF)"]
        figures |= {
            "llama_cpp_tok_s_c1": p1["tok_s"],
            "llama_cpp_tok_s_c16": p16["tok_s"],
            "ratio_c16_vs_llama_cpp": s16["tok_s"] / p16["tok_s"],
            "ratio_c1_vs_llama_cpp": s1["tok_s"] / p1["tok_s"],
            "llama_cpp_p99_ttft_ms": p16["p99_ttft"],
        }
    result(**figures)


if __name__ == "__main__":
    main()
