"""Prefill and decode speed of the student (our latent-cache loop) beside its teacher (transformers, KV cache).

What `evaluate` reports and `benchmarks/decode.py` records, measured one way: both models in one process on the
same threads, each with its own greedy loop over the same prompt (one prefill of the batch, then `new_tokens`
decode steps, timed apart, with no stop token), warmed up, and called in turn round by round so that drift in the
machine's speed hits both alike. Medians over rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int = 10,
    warmup: int = 2,
    setup: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn each round (on CUDA, each call is timed to
    the end of its kernels, not to their launch). `setup[name]`, where given, runs untimed before each call."""

    def sync() -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()

    setup = setup or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            if name in setup:
                setup[name]()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


Loops = tuple[Callable[[], None], Callable[[], None]]


def student_loops(student, prompt: list[int], batch: int, new_tokens: int, compiled=None) -> Loops:
    """(prefill, decode) callables of our greedy loop; decode continues the latest prefill. `compiled`: the
    student's `CompiledDecode`, for the decode steps it covers."""
    from pipeline.model.generate import decode, prefill

    state: dict = {}

    def run_prefill() -> None:
        cache = student.new_cache(batch, max_len=len(prompt) + new_tokens + 1)
        slots = [cache.allocate() for _ in range(batch)]
        state.update(cache=cache, slots=slots, logits=prefill(student, cache, slots, [prompt] * batch))

    def run_decode() -> None:
        logits = state["logits"]
        for _ in range(new_tokens):
            logits = decode(student, state["cache"], state["slots"], logits.argmax(-1).tolist(), compiled)

    return run_prefill, run_decode


def teacher_loops(teacher, prompt: list[int], batch: int, new_tokens: int) -> Loops:
    """(prefill, decode) callables of the same greedy loop on transformers' forward with its KV cache."""
    state: dict = {}
    device = next(teacher.parameters()).device
    ids = torch.tensor([prompt] * batch, device=device)

    @torch.no_grad()
    def run_prefill() -> None:
        out = teacher(input_ids=ids, use_cache=True)
        state.update(past=out.past_key_values, logits=out.logits[:, -1], length=ids.shape[1])

    @torch.no_grad()
    def run_decode() -> None:
        past, logits, length = state["past"], state["logits"], state["length"]
        for _ in range(new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            pos = torch.full((batch, 1), length, device=device)
            out = teacher(input_ids=nxt, past_key_values=past, position_ids=pos, use_cache=True)
            past, logits, length = out.past_key_values, out.logits[:, -1], length + 1

    return run_prefill, run_decode


@dataclass(frozen=True)
class Speeds:
    """Tokens/s at one batch size: prompt tokens through prefill, new tokens through decode steps."""

    prefill: dict[str, float]  # by model name
    decode: dict[str, float]


def measure_speeds(
    models: dict[str, Callable[[list[int], int, int], Loops]],
    prompt: list[int],
    batch: int,
    new_tokens: int,
    rounds: int = 3,
    warmup: int = 1,
) -> Speeds:
    """Prefill and decode tokens/s of each model's loops (`models[name](prompt, batch, new_tokens)`), interleaved.

    Decode is timed on its own: each timed decode continues an untimed prefill of its own.
    """
    loops = {name: make(prompt, batch, new_tokens) for name, make in models.items()}
    pre = interleaved({n: p for n, (p, _) in loops.items()}, rounds=rounds, warmup=warmup)
    dec = interleaved(
        {n: d for n, (_, d) in loops.items()}, rounds=rounds, warmup=warmup, setup={n: p for n, (p, _) in loops.items()}
    )
    return Speeds(
        prefill={n: batch * len(prompt) / s for n, s in pre.items()},
        decode={n: batch * new_tokens / s for n, s in dec.items()},
    )


def student_and_teacher(student, teacher, compiled=None) -> dict[str, Callable[[list[int], int, int], Loops]]:
    """The `models` of `measure_speeds` for a student (with its `CompiledDecode`, if any) and (None: not
    measured) its teacher."""
    models: dict[str, Callable[[list[int], int, int], Loops]] = {
        "student": lambda p, b, n: student_loops(student, p, b, n, compiled)
    }
    if teacher is not None:
        models["teacher"] = lambda p, b, n: teacher_loops(teacher, p, b, n)
    return models
