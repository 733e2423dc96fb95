"""One prepared check of the GPU path, to run on any CUDA machine: everything written for GPUs — bf16 autocast and
NCCL in training, the experts' grouped GEMMs, MLA decoding, the teacher and the student on CUDA, serving under
concurrency — run once, with a one-line summary per part.

    python benchmarks/gpu_check.py             # a CUDA machine: every part, about 5 minutes on one H200
    python benchmarks/gpu_check.py --dry-run   # anywhere: the parts that need no CUDA, tiny sizes (a test runs it)

Parts, each in its own process (a crash in one is reported, not inherited):
  train     the student's training step through `actors.trainer.fit` (the `train` stage's Ray Train path): one DDP
            worker with bf16 autocast, then FSDP2 (bf16 mixed precision) on 2 ranks where there are 2 GPUs, else 1;
            NCCL on CUDA (gloo on CPU, 2 FSDP ranks in the dry run); tokens/s, MFU, final loss of each
  moe       MoE layer forward+backward, ours vs transformers' DeepseekV3MoE (`benchmarks/moe_layer.py`), at the tiny
            shape and, on CUDA, a DeepSeek-V3-like one (64 routed experts, top-6, dim 1024), bf16
  mla       MLA decode, `absorb` vs `naive` (`benchmarks/mla_cache.py`), at 2k and 16k cached tokens on CUDA
  generate  the `hf` teacher backend generating a batch on the device, tokens/s; then the `vllm` backend if vllm is
            importable (it is not installed by the set-up and this machine's device has no index to fetch it from)
  serve     the OpenAI-compatible Serve app with the student on the device: 16 concurrent streams vs one at a time
            (`benchmarks/serve_load.py`; in the dry run on both CPU engines, moeforge and llama_cpp, with the toy
            student: the default one's conversion has its own tests)
  vllm      the student in DeepSeek-V3's standard layout, exported to Hugging Face (`moeforge export --format hf`):
            vLLM loads it and its greedy tokens for 32 steps are compared with ours in bf16; then Ray Serve LLM
            (`LLMConfig` + `build_openai_app`) serves it and the teacher in turn, 64 concurrent chat conversations of
            ~2k tokens each, aggregate tok/s (target: the student >= 1.5x the teacher). In the dry run: transformers
            loads the export and its greedy tokens are compared with ours (vLLM needs CUDA)

Each part prints `PART <name> ok: <figures>` or `SKIP <name>: <why>`; the first failure prints `FAILED <name>: <why>`
(with the part's last output) and exits 1. The last line is `RESULT key=value ...` with every part's figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("train", "moe", "mla", "generate", "serve", "vllm")
PART_TIMEOUT_S = {"train": 360, "moe": 180, "mla": 120, "generate": 180, "serve": 300, "vllm": 480}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def last_result(output: str) -> dict:
    """The figures of a benchmark's `RESULT k=v ...` line."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError("no RESULT line in its output")
    figures: dict = {}
    for key, value in (kv.split("=", 1) for kv in lines[-1].split()[1:]):
        try:
            figures[key] = float(value)
        except ValueError:
            figures[key] = value
    return figures


def run_script(args: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return last_result(proc.stdout)


# ---------------------------------------------------------------------------------------------------- parts


def part_train(dry: bool) -> dict:
    """`fit` on synthetic soft targets shaped like the distilled dataset: one DDP worker, then FSDP2 on 2 ranks
    (2 GPUs, or 2 CPU workers in the dry run; 1 rank on a one-GPU machine)."""
    import statistics

    import pyarrow as pa
    import ray
    import torch
    from mlflow import MlflowClient

    sys.path.insert(0, str(HERE))
    from train_workers import VOCAB, K, synthetic_rows, write_shards

    from actors.trainer import fit
    from pipeline.config import TrainConfig
    from pipeline.model.config import model_preset
    from pipeline.stages.parquet_schemas import soft_targets_schema
    from pipeline.train.replica import TrainJob

    gpu = not dry
    gpus = torch.cuda.device_count() if gpu else 0
    steps, rows = (4, 16) if dry else (30, 512)
    ray.init(num_cpus=2 if dry else 8, num_gpus=gpus, log_to_driver=False)
    out: dict = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"sqlite:///{tmp}/mlflow.db"
            client = MlflowClient(uri)
            experiment = client.create_experiment("gpu-check", f"{tmp}/artifacts")
            table = pa.Table.from_pylist(synthetic_rows(rows), schema=soft_targets_schema("float16"))
            data = write_shards(table, f"{tmp}/st", row_group_rows=max(1, rows // 8))
            fsdp_ranks = 2 if dry else max(1, min(2, gpus))
            for parallelism, workers in (("ddp", 1), ("fsdp", fsdp_ranks)):
                run_id = client.create_run(experiment).info.run_id
                train = TrainConfig(
                    num_workers=workers,
                    parallelism=parallelism,
                    use_gpu=gpu,
                    cpus_per_worker=(2 if dry else 4) // workers,
                    max_steps=steps,
                    warmup_steps=1,
                    batch_size=2 if dry else 16,
                    micro_batch_size=None,  # the whole batch per forward: the GPU's throughput is measured
                    seq_len=64 if dry else 512,
                    checkpoint_every=steps,
                )
                job = TrainJob(model_preset("toy", vocab_size=VOCAB), train, K, run_id, uri, data=data)
                result = fit(job, f"gpu-check-{parallelism}", f"{tmp}/ckpt")
                if result.error is not None:
                    raise RuntimeError(f"{parallelism} training failed: {result.error}")
                history = sorted(client.get_metric_history(run_id, "tokens_per_s"), key=lambda m: m.step)
                mfu = sorted(client.get_metric_history(run_id, "mfu"), key=lambda m: m.step)
                loss = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
                tags = client.get_run(run_id).data.tags
                skip = min(3, len(history) - 1)  # the first steps pay for compilation and allocator warm-up
                name = "train" if parallelism == "ddp" else "train_fsdp"
                out[f"{name}_tok_s"] = statistics.median(m.value for m in history[skip:])
                out[f"{name}_mfu"] = statistics.median(m.value for m in mfu[skip:])
                out[f"{name}_final_loss"] = loss[-1].value
                if parallelism == "ddp":
                    out["train_device"] = tags.get("moeforge.train.device", "?")
                    out["train_peak_flops"] = float(tags["moeforge.train.mfu_peak"].split()[0])
                else:
                    out["train_fsdp_ranks"] = workers
        return out
    finally:
        ray.shutdown()


def part_moe(dry: bool) -> dict:
    device = ["--device", "cpu"] if dry else ["--device", "cuda", "--dtype", "bfloat16"]
    tiny = run_script(
        ["benchmarks/moe_layer.py", "--tokens", "256" if dry else "8192", "--rounds", "2" if dry else "10", *device],
        PART_TIMEOUT_S["moe"],
    )
    out = {"moe_tiny_speedup": tiny["speedup_vs_transformers"], "moe_tiny_tok_s": tiny["ours_tok_s"]}
    if not dry:
        big = run_script(
            [
                "benchmarks/moe_layer.py",
                "--tokens",
                "8192",
                "--dim",
                "1024",
                "--experts",
                "64",
                "--topk",
                "6",
                "--inter",
                "512",
                "--shared",
                "1",
                "--rounds",
                "10",
                "--no-loop",
                *device,
            ],
            PART_TIMEOUT_S["moe"],
        )
        out.update(moe_v3_speedup=big["speedup_vs_transformers"], moe_v3_tok_s=big["ours_tok_s"])
    return out


def part_mla(dry: bool) -> dict:
    contexts = ["128"] if dry else ["2048", "16384"]
    figures = run_script(
        [
            "benchmarks/mla_cache.py",
            "--contexts",
            *contexts,
            "--device",
            "cpu" if dry else "cuda",
            "--batch",
            "2" if dry else "8",
            "--steps",
            "2" if dry else "16",
            "--rounds",
            "1" if dry else "5",
        ],
        PART_TIMEOUT_S["mla"],
    )
    return {f"mla_absorb_speedup_{c}": figures[f"absorb_speedup_{c}"] for c in contexts}


def part_generate(dry: bool) -> dict:
    import importlib.util

    from pipeline.data.prompts import teacher_messages
    from pipeline.teacher.hf import DEFAULT_TEACHER, HFTeacher, default_cache_dir, resolve_model_dir

    device = "cpu" if dry else "cuda"
    teacher = HFTeacher(
        resolve_model_dir(DEFAULT_TEACHER, default_cache_dir()), dtype="float32" if dry else "bfloat16", device=device
    )
    n, tokens = (2, 8) if dry else (64, 128)
    conversations = [teacher_messages("basic_arithmetic", f"Calculate {i} + {2 * i + 1}.") for i in range(n)]
    teacher.generate(conversations[:2], max_new_tokens=4)  # warm-up
    t0 = time.perf_counter()
    out = teacher.generate(conversations, max_new_tokens=tokens)
    seconds = time.perf_counter() - t0
    figures: dict = {"generate_hf_tok_s": sum(g.completion_tokens for g in out) / seconds}
    if dry:
        figures["generate_vllm"] = "skipped-no-cuda"
    elif importlib.util.find_spec("vllm") is None:
        figures["generate_vllm"] = "skipped-not-installed"
    else:
        from pipeline.config import TeacherConfig
        from pipeline.teacher import load_teacher

        vllm_teacher = load_teacher(TeacherConfig(backend="vllm", max_new_tokens=tokens), default_cache_dir())
        vllm_teacher.generate(conversations[:2], max_new_tokens=4)
        t0 = time.perf_counter()
        out = vllm_teacher.generate(conversations, max_new_tokens=tokens)
        figures["generate_vllm_tok_s"] = sum(g.completion_tokens for g in out) / (time.perf_counter() - t0)
    return figures


def part_serve(dry: bool) -> dict:
    args = (
        ["--requests", "2", "--max-tokens", "8", "--rounds", "1", "--cpus", "1", "--batch", "2", "--no-peer",
         "--student", "toy"]
        if dry
        else ["--requests", "16", "--max-tokens", "128", "--rounds", "2", "--cpus", "4", "--gpus", "1", "--batch", "16",
              "--engines", "moeforge", "--no-peer"]
    )  # fmt: skip
    figures = run_script(["benchmarks/serve_load.py", *args], PART_TIMEOUT_S["serve"])
    out = {
        "serve_speedup": figures["moeforge_tok_s_c16"] / figures["moeforge_tok_s_c1"],
        "serve_tok_s_concurrent": figures["moeforge_tok_s_c16"],
        "serve_p99_ttft_ms": figures["moeforge_p99_ttft_ms"],
    }
    if "llama_cpp_tok_s_c16" in figures:
        out["serve_llama_cpp_tok_s_concurrent"] = figures["llama_cpp_tok_s_c16"]
    return out


def _vllm_load(source: Path, model_id: str, conversations: list[list[dict]], max_tokens: int) -> float:
    """Ray Serve LLM serving `source` (a Hugging Face directory) in vLLM: aggregate completion tok/s of every
    conversation sent at once through the OpenAI API."""
    import asyncio

    import openai
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    config = LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": str(source)},
        engine_kwargs={"dtype": "bfloat16", "max_model_len": 4096, "max_num_seqs": 64},
        accelerator_type=None,
    )
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(messages: list[dict]) -> int:
        r = await client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        return r.usage.completion_tokens if r.usage else 0

    async def all_at_once() -> float:
        await one(conversations[0])  # warm-up
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(c) for c in conversations))
        return sum(tokens) / (time.perf_counter() - t0)

    try:
        return asyncio.run(all_at_once())
    finally:
        serve.shutdown()


def part_vllm(dry: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="moeforge-gpu-check-") as tmp:  # the exports are GBs on a GPU run
        return _vllm_check(Path(tmp), dry)


def _vllm_check(work: Path, dry: bool) -> dict:
    import importlib.util

    import torch
    from serve_load import build_student

    from pipeline.data.prompts import chat_token_ids, student_messages
    from pipeline.export import export
    from pipeline.model import Transformer
    from pipeline.model.generate import SamplingParams, generate

    # on a GPU the default student converted from the teacher in the standard layout; the dry run checks the wiring
    # on the scratch toy student (standard by construction), which needs no conversion
    build_student(work / "student", "toy" if dry else "default")
    hf_dir = export(work / "student", "hf", work / "hf")
    device, dtype, steps = ("cpu", torch.float32, 8) if dry else ("cuda", torch.bfloat16, 32)
    ours = Transformer.from_pretrained(work / "student").eval().to(device, dtype)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    questions = ["What is 17 + 25?", "How many times does the letter r appear in the text: strawberry?"]
    prompts = [chat_token_ids(tokenizer, student_messages(q)) for q in questions]
    want = [c.tokens for c in generate(ours, prompts, SamplingParams(max_new_tokens=steps))]
    if dry:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
        got = []
        for p in prompts:  # greedy by whole forward passes (what the export's logits equality means)
            ids = list(p)
            with torch.no_grad():
                for _ in range(steps):
                    ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            got.append(ids[len(p) :])
        match = sum(g == w for g, w in zip(got, want, strict=True)) / len(want)
        return {"hf_export_greedy_match": match, "vllm": "skipped-no-cuda"}
    if importlib.util.find_spec("vllm") is None:
        return {"vllm": "skipped-not-installed"}
    from vllm import LLM
    from vllm import SamplingParams as VllmSampling

    llm = LLM(model=str(hf_dir), dtype="bfloat16", max_model_len=4096, enforce_eager=True)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], VllmSampling(temperature=0, max_tokens=steps, ignore_eos=True)
    )
    match = sum(list(o.outputs[0].token_ids) == w for o, w in zip(outs, want, strict=True)) / len(want)
    del llm
    torch.cuda.empty_cache()
    history = " ".join(f"{i} + {i + 1} = {2 * i + 1}." for i in range(260))  # ~2k tokens of context
    conversations = [
        [{"role": "user", "content": history}, {"role": "assistant", "content": "Noted."},
         {"role": "user", "content": f"What is {i} + {i + 7}?"}]
        for i in range(64)
    ]  # fmt: skip
    from pipeline.teacher.hf import DEFAULT_TEACHER, default_cache_dir, resolve_model_dir

    student_tok_s = _vllm_load(hf_dir, "student", conversations, 128)
    teacher_tok_s = _vllm_load(resolve_model_dir(DEFAULT_TEACHER, default_cache_dir()), "teacher", conversations, 128)
    return {
        "vllm_greedy_match": match,
        "vllm_student_tok_s_64x2k": student_tok_s,
        "vllm_teacher_tok_s_64x2k": teacher_tok_s,
        "vllm_student_over_teacher": student_tok_s / teacher_tok_s,
    }


def run_part(name: str, dry: bool) -> None:
    """Child process: run one part, print its figures as one JSON line."""
    figures = globals()[f"part_{name}"](dry)
    print("FIGURES " + json.dumps(figures))


# ---------------------------------------------------------------------------------------------------- driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="no CUDA needed: tiny sizes, CUDA-only parts skipped")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.part:
        run_part(args.part, args.dry_run)
        return 0
    dry = args.dry_run
    if not dry and not cuda():
        print("FAILED setup: no CUDA device here; run with --dry-run to check the wiring on CPU")
        return 1
    print(f"gpu_check: {'dry run on CPU (tiny sizes)' if dry else 'CUDA'}; parts {', '.join(args.parts)}")
    every: dict = {}
    started = time.perf_counter()
    for name in args.parts:
        t0 = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, *(["--dry-run"] if dry else [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PART_TIMEOUT_S[name], cwd=HERE.parent)
        except subprocess.TimeoutExpired:
            print(f"FAILED {name}: no answer within {PART_TIMEOUT_S[name]} s")
            return 1
        lines = [line for line in proc.stdout.splitlines() if line.startswith("FIGURES ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
            print(f"FAILED {name}: exit {proc.returncode}\n" + "\n".join(f"    {line}" for line in tail))
            return 1
        figures = json.loads(lines[-1][len("FIGURES ") :])
        every.update(figures)
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        print(f"PART {name} ok ({time.perf_counter() - t0:.0f} s): {shown}")
    if dry:
        print(
            "SKIP moe at the DeepSeek-V3-like shape, mla at 16k, vllm and Ray Serve LLM on the HF export, bf16/NCCL "
            "training (DDP and FSDP2), the student on CUDA: need CUDA"
        )
    print(f"gpu_check: all parts passed in {time.perf_counter() - started:.0f} s")
    print("RESULT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in every.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
