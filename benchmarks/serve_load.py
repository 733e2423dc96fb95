"""Serving throughput and latency: 16 chat requests one at a time and all at once, on each serving engine and on
llama.cpp's own server.

A real local Ray Serve app (`actors/server.py`) serves the default student (`--student default`: converted from the
real default teacher in the standard layout, as `make run` builds it; speed does not
depend on what the weights learned; `--student toy`: the 29M scratch student older figures were measured on) with
the real tokenizer, once on each engine (`--engines`): `moeforge` (its own PyTorch engine) and `llama_cpp`
(llama.cpp on the student's GGUF export at `--quant`, batched over the running sequences). The same 16 chat
requests (distinct questions with the student's instruction as system message, greedy, `max_tokens` fixed, no stop
at the end-of-turn token, so every request produces exactly that many tokens) are sent through the official
`openai` client at concurrency 1 (one at a time) and at concurrency 16 (all at once: continuous batching shares each
decode step). Where `make peers` built it, llama-cpp-python's OpenAI-compatible server on the same student GGUF
gets the same requests on the same cores (its end-of-turn token masked by `logit_bias`), before our app starts; it
runs one request at a time.
Rounds alternate the two concurrencies so drift hits both; medians over rounds. Aggregate output tokens/s counts
the usage the server reported; time to first token (TTFT) and inter-token latency (ITL, the gap between content
chunks) are measured per stream on the client.

The TTFT floor beside each engine: the seconds it needs to prefill all 16 prompts in one batch (in this process, on
the replica's thread count, with nothing else running), what the first token of the last of 16 simultaneous
requests cannot beat.

    python benchmarks/serve_load.py [--student default|toy] [--engines moeforge,llama_cpp] [--quant q4_1]
        [--requests 16] [--max-tokens 64] [--rounds 2] [--batch 16] [--cpus 2] [--dtype float32|auto|bfloat16]
        [--compile-max-batch 0] [--no-peer]
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
    cfg = model_preset("tiny", vocab_size=len(tokenizer))
    student, _ = convert(teacher, cfg, calibrate(teacher, calib, 256), layout="standard")
    student.save_pretrained(directory, tokenizer)


def prefill_floor(directory: Path, n: int, threads: int, dtype: str, gguf: Path | None = None) -> float:
    """Median seconds the engine (moeforge's; llama.cpp's on `gguf`) takes to prefill the `n` requests' prompts in
    one batch."""
    import torch
    from _common import interleaved

    from pipeline.data.prompts import chat_token_ids
    from pipeline.serving.engine import TorchRunner
    from pipeline.serving.llama_cpp_runner import LlamaCppRunner
    from pipeline.student import Student

    torch.set_num_threads(threads)
    student = Student(directory, "cpu", dtype)
    prompts = [chat_token_ids(student.tokenizer, messages(i)) for i in range(n)]
    length = max(map(len, prompts)) + 1
    runner = LlamaCppRunner(gguf, n, length, threads) if gguf else TorchRunner(student.model, n, length)

    def run() -> None:
        slots = [runner.allocate() for _ in range(n)]
        try:
            runner.prefill(slots, prompts)
        finally:
            for slot in slots:
                runner.free(slot)

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


def serve_student(args, directory: Path, engine: str) -> tuple[list[dict], list[dict]]:
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
        engine=engine,
        gguf_quant=args.quant,
    )
    try:
        url = start(settings, str(directory), None)
        return rounds_of(f"{url}/v1", "student", args, {"extra_body": {"ignore_eos": True}})
    finally:
        serve.shutdown()
        ray.shutdown()


def report(args, table: dict[str, tuple[list[dict], list[dict]]], floors: dict[str, float]) -> dict[str, float]:
    """Print the table; return the RESULT figures (`<engine>_...`, and the ratios the targets name)."""
    print(f"{'':<24}{'tok/s':>8}{'p50 TTFT':>10}{'p99 TTFT':>10}{'p50 ITL':>9}{'p99 ITL':>9}   (ms)")
    s = {}
    for who, (seq, par) in table.items():
        s[who] = summary(seq), summary(par)
        for name, row in zip(("c=1", f"c={args.requests}"), s[who], strict=True):
            print(
                f"{who[:14] + ' ' + name:<24}{row['tok_s']:>8.1f}{row['p50_ttft']:>10.1f}{row['p99_ttft']:>10.1f}"
                f"{row['p50_itl']:>9.1f}{row['p99_itl']:>9.1f}"
            )
    figures: dict[str, float] = {}
    for engine, floor_ms in floors.items():
        s1, s16 = s[engine]
        print(f"{engine}: prefill of all {args.requests} prompts in one batch (the TTFT floor): {floor_ms:.0f} ms")
        figures |= {
            f"{engine}_tok_s_c1": s1["tok_s"],
            f"{engine}_tok_s_c16": s16["tok_s"],
            f"{engine}_p99_ttft_ms": s16["p99_ttft"],
            f"{engine}_prefill_floor_ms": floor_ms,
            f"{engine}_p99_ttft_over_floor": s16["p99_ttft"] / floor_ms,
        }
    if "llama_cpp" in s and "moeforge" in s:
        figures["llama_cpp_over_moeforge_c1"] = s["llama_cpp"][0]["tok_s"] / s["moeforge"][0]["tok_s"]
    if "llama.cpp server" in s:
        p1, p16 = s["llama.cpp server"]
        figures |= {"server_tok_s_c1": p1["tok_s"], "server_tok_s_c16": p16["tok_s"]}
        for engine in floors:
            figures[f"{engine}_over_server_c1"] = s[engine][0]["tok_s"] / p1["tok_s"]
            figures[f"{engine}_over_server_c16"] = s[engine][1]["tok_s"] / p16["tok_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", choices=["default", "toy"], default="default")
    parser.add_argument("--engines", default="moeforge,llama_cpp", help="serve.engine values to serve on")
    parser.add_argument("--quant", default="q4_1", choices=["f32", "f16", "q8_0", "q4_1"], help="the GGUF's")
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

    from pipeline.export import export

    threads = max(1, int(args.cpus))
    engines = args.engines.split(",")
    table, floors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "student"
        build_student(directory, args.student)
        gguf = export(directory, "gguf", Path(tmp) / "gguf", args.quant)  # type: ignore[arg-type]
        if not args.no_peer:
            with llama_cpp_server(threads, model=gguf) as base:
                if base is not None:
                    eos = AutoTokenizer.from_pretrained(str(directory)).eos_token_id
                    no_stop = {"logit_bias": {str(eos): -100}}
                    table["llama.cpp server"] = rounds_of(base, LlamaCppServer.MODEL, args, no_stop)
        for engine in engines:
            table[engine] = serve_student(args, directory, engine)
            floors[engine] = 1e3 * prefill_floor(
                directory, args.requests, threads, args.dtype, gguf if engine == "llama_cpp" else None
            )
    print(
        f"{describe()}; {args.student} student, {args.dtype}, GGUF {args.quant}, replica CPUs {args.cpus}, GPUs "
        f"{args.gpus}, engine slots {args.batch}; {args.requests} requests x {args.max_tokens} tokens, "
        f"{args.rounds} rounds"
    )
    result(quant=args.quant, **report(args, table, floors))


if __name__ == "__main__":
    main()
