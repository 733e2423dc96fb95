"""Continuous batching on the latent KV cache: sequences join and leave the running batch between decode steps.

The engine owns the model and one `LatentKVCache` of `max_batch_size` slots, and runs a loop in its own thread.
Each iteration it
  1. drops sequences whose caller went away (their slots are free for the next step),
  2. admits waiting sequences into free slots, all newcomers in one batched prefill,
  3. advances every running sequence by one token in one batched decode step,
and samples each row with that sequence's own settings and random stream (`pipeline.model.generate.sample`).

Callers on an asyncio event loop (a Serve replica, FastAPI) iterate `Engine.stream(...)`; tokens cross from the
engine thread with `loop.call_soon_threadsafe`. torch releases the GIL inside its kernels, so the event loop keeps
accepting and answering HTTP while a step runs. Closing the iterator early (a client that disconnected, a stop
string found by the caller) aborts the sequence and frees its slot before the next step.

Prefill of a long prompt holds the running batch for one iteration (no chunked prefill): prompts here are short
and the context is the model's `max_seq_len`.

The forward passes are a runner's (`ForwardRunner`): `TorchRunner`, moeforge's own model on its latent KV cache
(any layout), or `LlamaCppRunner` (llama_cpp_runner.py), llama.cpp on the student's GGUF export, one llama.cpp
sequence per slot. Scheduling, sampling and stopping are the engine's, the same for both.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.model.generate import CompiledDecode, SamplingParams, decode, make_generator, prefill, sample
from pipeline.model.transformer import Transformer


class EngineError(RuntimeError):
    """The engine could not run a sequence (a failed step, or the engine stopped)."""


@dataclass(frozen=True)
class StepOutput:
    """One event of a sequence: a new token, and whether the sequence ended with it (or without one)."""

    token: int | None
    finish_reason: str | None = None  # "stop" (stop token), "length" (max_new_tokens / context), "abort"
    error: str | None = None


class Sequence:
    """A prompt being completed; its outputs are delivered to the event loop that submitted it."""

    def __init__(self, seq_id: int, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.id, self.prompt, self.params, self.loop = seq_id, prompt, params, loop
        self.generator = make_generator(params.seed)
        self.outputs: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.tokens: list[int] = []
        self.slot: int | None = None
        self.cached = 0  # tokens written to the cache (the last sampled token is not yet)
        self.aborted = False  # set by the caller's thread, read by the engine's
        self.finish_reason: str | None = None

    @property
    def cache_slot(self) -> int:
        """The slot this sequence holds while it runs (allocated on admission, freed when it finishes)."""
        if self.slot is None:
            raise EngineError(f"sequence {self.id} holds no cache slot: it is not running")
        return self.slot

    def _emit(self, out: StepOutput) -> None:  # engine thread
        if out.finish_reason is not None or out.error is not None:
            self.finish_reason = out.finish_reason or "error"
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, out)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self.aborted = True


class ForwardRunner(Protocol):
    """The forward passes an engine schedules: slots of a KV cache, prompts written into fresh slots, one token
    per running slot; each returns the last position's logits, one row per slot (B, V)."""

    name: str  # the engine's name, as `serve.engine` and /v1/models say it
    max_len: int  # tokens per slot

    def allocate(self) -> int: ...

    def free(self, slot: int) -> None: ...

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor: ...

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor: ...

    def warm_up(self, max_batch_size: int) -> None: ...


class TorchRunner:
    """moeforge's own forward passes: the `Transformer` on its latent KV cache (`compiled`: the compiled decode
    step, used for the batch sizes it covers)."""

    name = "moeforge"

    def __init__(self, model: Transformer, max_batch_size: int, max_len: int, compiled: CompiledDecode | None = None):
        self.model, self.compiled, self.max_len = model.eval(), compiled, max_len
        self.cache = model.new_cache(max_batch_size, max_len)

    def allocate(self) -> int:
        return self.cache.allocate()

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        return prefill(self.model, self.cache, slots, prompts)

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        return decode(self.model, self.cache, slots, tokens, self.compiled)

    def warm_up(self, max_batch_size: int) -> None:
        """Compile the decode step at every batch size `compiled` covers (each takes about a minute for the default
        student on 2 CPU cores), so no client waits for it. Uses free slots and leaves them free."""
        if self.compiled is None:
            return
        for batch in range(1, min(self.compiled.max_batch, max_batch_size) + 1):
            slots = [self.cache.allocate() for _ in range(batch)]
            try:
                logits_BV = self.prefill(slots, [[0]] * batch)
                for _ in range(3):  # eager (new weights), then compiling, then compiled
                    logits_BV = self.decode(slots, logits_BV.argmax(-1).tolist())
            finally:
                for slot in slots:
                    self.cache.free(slot)


class Engine:
    """Continuous batching for one model: a `Transformer` (run by `TorchRunner`) or any `ForwardRunner`.

    Args:
        model: the student, in eval mode, on its device; or a runner (which then owns its context length).
        max_batch_size: sequences decoded together (cache slots); more wait in FIFO order.
        max_len: tokens per sequence (prompt + completion); default the model's `max_seq_len`.
        compiled: the model's compiled decode step (`CompiledDecode`), used for the batch sizes it covers.
    """

    def __init__(
        self,
        model: Transformer | ForwardRunner,
        max_batch_size: int,
        max_len: int | None = None,
        compiled: CompiledDecode | None = None,
    ):
        if isinstance(model, Transformer):
            length = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
            model = TorchRunner(model, max_batch_size, length, compiled)
        self.runner: ForwardRunner = model
        self.max_len = model.max_len
        self.max_batch_size = max_batch_size
        self._ids = itertools.count()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.steps = 0  # decode steps run
        self.tokens_generated = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="moeforge-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------------ callers

    def submit(
        self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None
    ) -> Sequence:
        """Queue a sequence; its outputs arrive on `loop` (default: the running loop)."""
        if not prompt:
            raise ValueError("empty prompt: a sequence needs at least one token")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                f"context of {self.max_len} tokens"
            )
        if not self.alive:
            raise EngineError(f"the engine is not running ({self.last_error or 'stopped'})")
        seq = Sequence(next(self._ids), list(prompt), params, loop or asyncio.get_running_loop())
        with self._cond:
            self._waiting.append(seq)
            self._cond.notify()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop generating for `seq`; its slot is freed before the next step."""
        if seq.finish_reason is None:
            seq.aborted = True
            with self._cond:
                self._cond.notify()

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncGenerator[StepOutput, None]:
        """Submit a sequence and yield its outputs; closing the iterator early aborts it."""
        seq = self.submit(prompt, params)
        try:
            while True:
                out = await seq.outputs.get()
                if out.error is not None:
                    raise EngineError(out.error)
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            self.abort(seq)

    def stop(self) -> None:
        """End the loop; sequences still queued or running finish with "abort"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stats(self) -> dict[str, int]:
        with self._cond:
            running, waiting = len(self._running), len(self._waiting)
        return {
            "running": running,
            "waiting": waiting,
            "free_slots": self.max_batch_size - running,
            "max_batch_size": self.max_batch_size,
            "decode_steps": self.steps,
            "tokens_generated": self.tokens_generated,
        }

    @property
    def name(self) -> str:
        return self.runner.name

    def compile_steps(self) -> None:
        """Warm the runner up before the first request (`TorchRunner`: compile its decode step), so no client waits
        for it; call it before serving."""
        with self._cond:
            if self._running or self._waiting:
                raise RuntimeError("compile_steps runs before the engine serves")
            self.runner.warm_up(self.max_batch_size)

    # ------------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                for seq in [s for s in self._running if s.aborted]:
                    self._finish(seq, "abort")
                admitted = self._admit()
            if admitted:
                self._step(admitted, prefill_step=True)
            ready = [s for s in self._running if s.finish_reason is None and not s.aborted and s.tokens]
            if ready:
                self._step(ready, prefill_step=False)
        with self._cond:
            for seq in list(self._running):
                self._finish(seq, "abort")
            while self._waiting:
                self._waiting.popleft()._emit(StepOutput(None, "abort"))

    def _admit(self) -> list[Sequence]:
        """Waiting sequences moved into free slots, oldest first; one aborted while waiting just ends (caller holds
        the lock)."""
        admitted = []
        while self._waiting and len(self._running) < self.max_batch_size:
            seq = self._waiting.popleft()
            if seq.aborted:
                seq._emit(StepOutput(None, "abort"))
                continue
            seq.slot = self.runner.allocate()
            self._running.append(seq)
            admitted.append(seq)
        return admitted

    def _step(self, seqs: list[Sequence], prefill_step: bool) -> None:
        """One forward pass for `seqs` (their prompts, or their last tokens), then one sampled token each."""
        try:
            slots = [s.cache_slot for s in seqs]
            if prefill_step:
                logits_BV = self.runner.prefill(slots, [s.prompt for s in seqs])
            else:
                logits_BV = self.runner.decode(slots, [s.tokens[-1] for s in seqs])
                self.steps += 1
            tokens = sample(logits_BV.cpu(), [s.params for s in seqs], [s.generator for s in seqs])
        except Exception as e:  # noqa: BLE001 - a failed step fails its sequences, not the server
            self.last_error = f"{type(e).__name__}: {e}"
            with self._cond:
                for seq in seqs:
                    self._finish(seq, None, error=self.last_error)
            return
        with self._cond:
            for seq, token in zip(seqs, tokens, strict=True):
                seq.cached = len(seq.prompt) if prefill_step else seq.cached + 1
                seq.tokens.append(token)
                self.tokens_generated += 1
                if token in seq.params.stop_token_ids:
                    reason = "stop"
                elif len(seq.tokens) >= seq.params.max_new_tokens or seq.cached + 1 >= self.max_len:
                    reason = "length"
                else:
                    reason = None
                if reason is None:
                    seq._emit(StepOutput(token))
                else:
                    self._finish(seq, reason, token)

    def _finish(self, seq: Sequence, reason: str | None, token: int | None = None, error: str | None = None) -> None:
        """Free the slot and deliver the last event (caller holds the lock)."""
        if seq.slot is not None:
            self.runner.free(seq.slot)
            seq.slot = None
        if seq in self._running:
            self._running.remove(seq)
        seq._emit(StepOutput(token, reason, error))
