"""One replica's request handling: the student, its continuous-batching engine, OpenAI requests in, typed OpenAI
responses (or SSE chunks) out.

`ModelServer` is a plain class: it loads the student, owns the `Engine`, checks each request against the
deployment's limits, turns it into engine sequences (one per choice) and the engine's tokens back into responses
(`openai_format.py`), with stop strings cut by `TextStream`. `app.py` puts the FastAPI app around it;
`actors/server.py` runs that app as a Ray Serve deployment, and tests can also drive it in-process. Every error a
client can cause is an `ApiError` raised before any token is generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ServeConfig
from pipeline.metrics import record
from pipeline.model.generate import SamplingParams, generate
from pipeline.serving.auth import load_api_key, require_key
from pipeline.serving.engine import Engine, EngineError
from pipeline.serving.openai_format import (
    DONE,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChunkWriter,
    CompletionChoice,
    ModelCard,
    TextCompletion,
    Usage,
    now,
)
from pipeline.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest, internal_error, new_id
from pipeline.serving.source import ModelSource, materialize
from pipeline.serving.text_stream import TextStream

log = logging.getLogger(__name__)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"  # routes, and the `route` tag of their metrics


@dataclass
class Choice:
    """One engine sequence of a request: which choice it is, its prompt and sampling."""

    index: int
    prompt: list[int]
    params: SamplingParams


@dataclass
class Event:
    """Progress of one choice: new text, and its finish reason when it is the choice's last event."""

    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int


class ModelServer:
    """One replica's model, engine and OpenAI request handling.

    Args:
        source: the resolved model (see `pipeline.serving.source.resolve`).
        settings: the `serve` config section (limits, batching, API key).
        tracking_uri: MLflow store of registry sources.
        cache_dir: where registry versions are downloaded.
        device: default cuda when available.
        api_key: the key clients must send, when the deployer read it (the environment where it deployed);
            None: `settings`' key file or environment variable here. No key at all on a non-loopback host refuses
            to start unless `settings.allow_unauthenticated`.
    """

    def __init__(
        self,
        source: ModelSource,
        settings: ServeConfig,
        tracking_uri: str | None,
        cache_dir: str | Path,
        device: str | None = None,
        api_key: str | None = None,
    ):
        import torch

        from pipeline.data.prompts import INSTRUCTION
        from pipeline.student import Student

        self.source, self.settings = source, settings
        self.api_key = api_key or load_api_key(settings)  # checked by the app on every route but /healthz
        require_key(settings, self.api_key)  # before the model is loaded: a refused server costs nothing
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        student = Student(materialize(source, tracking_uri, cache_dir), self.device)
        self.model, self.tokenizer = student.model, student.tokenizer
        self.eos = self.tokenizer.eos_token_id
        self.context = self.model.cfg.max_seq_len
        self.system_prompt = INSTRUCTION if settings.student_system_prompt else None
        self.created = now()
        self.params = self.model.num_params()  # fixed for the replica's life: counted once, not per request
        # one short generation first, so the first client does not pay for lazy initialisation
        generate(self.model, [self.tokenizer.encode("warm up") or [0]], SamplingParams(max_new_tokens=2))
        self.engine = Engine(self.model, settings.max_batch_size)

    # ------------------------------------------------------------------------------------------------ info

    @property
    def model_id(self) -> str:
        return self.source.name

    def accepts(self, model: str) -> bool:
        s = self.source
        return model in {s.name, s.uri, s.pinned_uri, f"{s.name}/{s.version}", f"{s.name}@{s.alias}"}

    def card(self) -> ModelCard:
        s, params = self.source, self.params
        return ModelCard(
            id=self.model_id,
            created=self.created,
            root=s.pinned_uri,
            max_model_len=self.context,
            moeforge={
                "uri": s.uri,
                "registered_name": s.name if s.version else None,
                "version": s.version,
                "alias": s.alias,
                "run_id": s.run_id,
                "parameters": {"total": params["total"], "active": params["active"]},
                "device": self.device,
                "max_batch_size": self.settings.max_batch_size,
            },
        )

    def healthy(self) -> bool:
        return self.engine.alive

    def stats(self) -> dict[str, Any]:
        """The engine's load and counters (for operators: served behind the key, unlike the health probe)."""
        if not self.engine.alive:
            raise EngineError(f"engine stopped: {self.engine.last_error or 'no error recorded'}")
        return {"model": self.model_id, **self.engine.stats()}

    # ------------------------------------------------------------------------------------------------ requests

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        from pipeline.data.prompts import chat_token_ids

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            return chat_token_ids(self.tokenizer, messages)
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation is the client's error
            raise ApiError(400, f"messages do not fit the model's chat template: {e}", param="messages") from None

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompts = []
        for p in req.prompts:
            ids = self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p)
            if not ids:
                raise ApiError(400, "prompt is empty after tokenization", param="prompt")
            if any(not 0 <= t < self.model.cfg.vocab_size for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {self.model.cfg.vocab_size})", param="prompt")
            prompts.append(ids)
        return prompts

    def choices(
        self, req: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]], default_tokens: int | None
    ) -> list[Choice]:
        """Check the request against this deployment's limits; one engine sequence per (prompt, n)."""
        s = self.settings
        if not self.accepts(req.model):
            raise ApiError(
                404,
                f"The model '{req.model}' does not exist; this server serves '{self.model_id}'.",
                param="model",
                code="model_not_found",
            )
        if req.n > s.max_n:
            raise ApiError(400, f"n is {req.n}; this server allows at most {s.max_n}.", param="n")
        requested = req.requested_tokens
        if requested is not None and requested > s.max_tokens_limit:
            raise ApiError(
                400, f"max_tokens is {requested}; this server allows at most {s.max_tokens_limit}.", param="max_tokens"
            )
        out = []
        for i, prompt in enumerate(prompts):
            room = self.context - len(prompt)
            tokens = requested or min(default_tokens or s.max_tokens_limit, s.max_tokens_limit, room)
            if tokens > room or room < 1:
                raise ApiError(
                    400,
                    f"This model's maximum context length is {self.context} tokens. However, you "
                    f"requested {len(prompt) + tokens} tokens ({len(prompt)} in the prompt, {tokens} "
                    "in the completion). Please reduce the prompt or max_tokens.",
                    param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                    code="context_length_exceeded",
                )
            for j in range(req.n):
                index = i * req.n + j
                out.append(
                    Choice(
                        index,
                        prompt,
                        SamplingParams(
                            max_new_tokens=tokens,
                            temperature=req.temperature,
                            top_p=req.top_p,
                            stop_token_ids=() if req.ignore_eos else (self.eos,),
                            seed=None if req.seed is None else req.seed + index,
                        ),
                    )
                )
        return out

    @property
    def metric_model(self) -> str:
        """The `model` tag of this replica's live metrics: name and version (or the directory's name)."""
        return f"{self.source.name}/{self.source.version}" if self.source.version else self.source.name

    def record_load(self) -> None:
        stats = self.engine.stats()
        record("moeforge_serve_queue_depth", stats["waiting"], model=self.metric_model)
        record("moeforge_serve_running", stats["running"], model=self.metric_model)

    async def events(self, choices: list[Choice], stops: list[str], route: str) -> AsyncIterator[Event]:
        """Run every choice in the engine at once; yield their progress as it comes (each ends with a finish).

        Records the request's time to first token and generation latency (`route` tags them).
        """
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        t0, first, tokens, finished = time.perf_counter(), None, 0, False

        async def pump(choice: Choice) -> None:
            text = TextStream(self.tokenizer, stops, {self.eos})
            n = 0
            try:
                async with contextlib.aclosing(self.engine.stream(choice.prompt, choice.params)) as outputs:
                    async for out in outputs:
                        delta, hit = ("", False)
                        if out.token is not None:
                            n += 1
                            delta, hit = text.add(out.token)
                        if hit:  # leaving the loop closes the stream, which frees the slot
                            queue.put_nowait(Event(choice.index, delta, "stop", n))
                            return
                        if out.finish_reason == "abort":
                            raise EngineError("the engine stopped before the sequence finished")
                        if out.finish_reason is not None:
                            queue.put_nowait(Event(choice.index, delta + text.flush(), out.finish_reason, n))
                            return
                        if delta:
                            queue.put_nowait(Event(choice.index, delta, None, n))
            except Exception as e:  # noqa: BLE001 - delivered to the request, which answers with an error
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        self.record_load()
        try:
            remaining = len(tasks)
            while remaining:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                if first is None and event.completion_tokens:
                    first = time.perf_counter() - t0
                    record("moeforge_serve_ttft_seconds", first, model=self.metric_model, route=route)
                if event.finish_reason is not None:
                    remaining -= 1
                    tokens += event.completion_tokens
                yield event
            finished = True
        finally:  # a disconnected client or an error: stop every choice still running
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if finished:
                record("moeforge_serve_latency_seconds", time.perf_counter() - t0, model=self.metric_model, route=route)
            record("moeforge_serve_generated_tokens", tokens, model=self.metric_model)
            self.record_load()

    async def complete(self, choices: list[Choice], stops: list[str], route: str) -> tuple[dict[int, Event], int]:
        """Run to the end: each choice's whole text, and the completion tokens of all of them."""
        texts: dict[int, list[str]] = {c.index: [] for c in choices}
        final: dict[int, Event] = {}
        async with contextlib.aclosing(self.events(choices, stops, route)) as events:
            async for e in events:
                texts[e.index].append(e.text)
                if e.finish_reason is not None:
                    final[e.index] = Event(e.index, "".join(texts[e.index]), e.finish_reason, e.completion_tokens)
        return final, sum(e.completion_tokens for e in final.values())

    # ------------------------------------------------------------------------------------------------ endpoints

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion | AsyncIterator[str]:
        self.check_sequences(1, req.n)
        prompt = self.chat_prompt(req)
        choices = self.choices(req, [prompt], None)
        rid, created = new_id("chatcmpl"), now()
        if req.stream:
            writer = ChunkWriter(
                rid, created, self.model_id, self.fingerprint, chat=True, include_usage=req.include_usage
            )
            return self._stream(choices, req.stops, [prompt], writer, CHAT)
        final, completion_tokens = await self.complete(choices, req.stops, CHAT)
        return ChatCompletion(
            id=rid,
            created=created,
            model=self.model_id,
            system_fingerprint=self.fingerprint,
            choices=[
                ChatChoice(index=i, message=AssistantMessage(content=e.text), finish_reason=e.finish_reason)
                for i, e in sorted(final.items())
            ],
            usage=Usage.of([prompt], completion_tokens),
        )

    def check_sequences(self, n_prompts: int, n: int) -> None:
        """A request's engine sequences (prompts x n) within the per-request cap, and room for them in the queue."""
        s = self.settings
        if n_prompts * n > s.max_sequences_per_request:
            raise ApiError(
                400,
                f"{n_prompts} prompt(s) x n={n} asks for {n_prompts * n} sequences; this server "
                f"allows at most {s.max_sequences_per_request} per request.",
                param="prompt" if n == 1 else "n",
            )
        waiting = self.engine.stats()["waiting"]
        if waiting + n_prompts * n > s.max_waiting_sequences:
            raise ApiError(
                503,
                f"The server is busy ({waiting} sequences waiting); retry shortly.",
                type_="server_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            )

    async def completions(self, req: CompletionRequest) -> TextCompletion | AsyncIterator[str]:
        self.check_sequences(len(req.prompts), req.n)  # before tokenizing what may be a huge list of prompts
        prompts = self.completion_prompts(req)
        choices = self.choices(req, prompts, req.max_tokens)
        rid, created = new_id("cmpl"), now()
        if req.stream:
            writer = ChunkWriter(
                rid, created, self.model_id, self.fingerprint, chat=False, include_usage=req.include_usage
            )
            return self._stream(choices, req.stops, prompts, writer, COMPLETIONS)
        final, completion_tokens = await self.complete(choices, req.stops, COMPLETIONS)
        return TextCompletion(
            id=rid,
            created=created,
            model=self.model_id,
            system_fingerprint=self.fingerprint,
            choices=[
                CompletionChoice(index=i, text=e.text, finish_reason=e.finish_reason) for i, e in sorted(final.items())
            ],
            usage=Usage.of(prompts, completion_tokens),
        )

    @property
    def fingerprint(self) -> str:
        return f"moeforge-{self.source.name}-{self.source.version or 'local'}"

    async def _stream(
        self, choices: list[Choice], stops: list[str], prompts: list[list[int]], writer: ChunkWriter, route: str
    ) -> AsyncIterator[str]:
        """OpenAI's streaming format: one chunk per piece of text, a finish chunk per choice, usage, [DONE]."""
        total = 0
        if writer.chat:
            for c in choices:
                yield writer.role(c.index)
        try:
            # closing this generator (a client that went away) closes the events at once, freeing the slots
            async with contextlib.aclosing(self.events(choices, stops, route)) as events:
                async for e in events:
                    if e.text:
                        yield writer.text(e.index, e.text)
                    if e.finish_reason is not None:
                        total += e.completion_tokens
                        yield writer.finish(e.index, e.finish_reason)
            if writer.include_usage:
                yield writer.usage(Usage.of(prompts, total))
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI-compatible servers do
            yield writer.error(internal_error(e, f"stream {writer.id}", 500, "Generation failed"))
        yield DONE
