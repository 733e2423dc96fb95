"""The OpenAI-compatible HTTP API of one model replica: request handling (`ModelServer`) and its FastAPI app.

`ModelServer` is a plain class: it loads the student, owns the continuous-batching `Engine`, turns OpenAI requests
into engine sequences (one per choice) and engine tokens back into OpenAI responses or Server-Sent-Event chunks.
`create_app(server)` is the FastAPI app around it; `actors/server.py` runs that app as a Ray Serve deployment,
and tests can also drive it in-process.

Every error a client can cause is a 4xx with OpenAI's error body (`{"error": {"message", "type", "param",
"code"}}`), decided before any token is generated; an unexpected failure is a 500 with the same shape, and the
replica keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from pipeline.config import ServeConfig
from pipeline.metrics import record
from pipeline.model.generate import SamplingParams, generate
from pipeline.serving.engine import Engine, EngineError
from pipeline.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    new_id,
    now,
)
from pipeline.serving.source import ModelSource, materialize

log = logging.getLogger(__name__)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"  # routes, and the `route` tag of their metrics


class TextStream:
    """Incremental detokenization of one choice, with OpenAI stop strings.

    Text is released only once it can no longer be the start of a stop string (the last `len(stop) - 1`
    characters are held back) and never in the middle of a multi-byte character; the stop string itself is not
    part of the output.
    """

    def __init__(self, tokenizer, stops: list[str], skip_ids: set[int]):
        self.tokenizer, self.stops, self.skip_ids = tokenizer, stops, skip_ids
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters released so far
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        """(newly releasable text, whether a stop string was reached)."""
        if token not in self.skip_ids:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = max(min(hits), self.sent)
            return self._release(text[:cut], cut), True
        return self._release(text, max(self.sent, len(text) - self.holdback)), False

    def flush(self) -> str:
        """Everything not released yet (the sequence ended without a stop string)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(text, len(text))

    def _release(self, text: str, upto: int) -> str:
        self.text = text[:upto]
        delta, self.sent = text[self.sent:upto], upto
        return delta


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


def load_api_key(settings: ServeConfig) -> str | None:
    """The key clients must send: the mounted secret file if configured, else the environment variable."""
    if settings.api_key_file:
        path = Path(settings.api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"serve.api_key_file {path} does not exist")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"serve.api_key_file {path} is empty")
        return key
    return os.environ.get(settings.api_key_env) or None


class ModelServer:
    """One replica's model, engine and OpenAI request handling.

    Args:
        source: the resolved model (see `pipeline.serving.source.resolve`).
        settings: the `serve` config section (limits, batching, API key).
        tracking_uri: MLflow store of registry sources.
        cache_dir: where registry versions are downloaded.
        device: default cuda when available.
    """

    def __init__(self, source: ModelSource, settings: ServeConfig, tracking_uri: str | None, cache_dir: str | Path,
                 device: str | None = None):
        import torch

        from pipeline.data.prompts import INSTRUCTION
        from pipeline.student import Student

        self.source, self.settings = source, settings
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        student = Student(materialize(source, tracking_uri, cache_dir), self.device)
        self.model, self.tokenizer = student.model, student.tokenizer
        self.eos = self.tokenizer.eos_token_id
        self.context = self.model.cfg.max_seq_len
        self.api_key = load_api_key(settings)
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

    def card(self) -> dict[str, Any]:
        params = self.params
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "moeforge",
                "root": self.source.pinned_uri, "max_model_len": self.context,
                "moeforge": {"uri": self.source.uri, "registered_name": self.source.name if self.source.version else None,
                             "version": self.source.version, "alias": self.source.alias, "run_id": self.source.run_id,
                             "parameters": {"total": params["total"], "active": params["active"]},
                             "device": self.device, "max_batch_size": self.settings.max_batch_size}}

    def health(self) -> dict[str, Any]:
        if not self.engine.alive:
            raise EngineError(f"engine stopped: {self.engine.last_error or 'no error recorded'}")
        return {"status": "ok", "model": self.model_id, **self.engine.stats()}

    def check_api_key(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        if not authorization or not authorization.startswith("Bearer "):
            raise ApiError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code="invalid_api_key")
        if not hmac.compare_digest(authorization[len("Bearer "):].strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    # ------------------------------------------------------------------------------------------------ requests

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        from pipeline.data.prompts import chat_token_ids

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
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

    def choices(self, req: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]],
                default_tokens: int | None) -> list[Choice]:
        """Check the request against this deployment's limits; one engine sequence per (prompt, n)."""
        s = self.settings
        if not self.accepts(req.model):
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{self.model_id}'.",
                           param="model", code="model_not_found")
        if req.n > s.max_n:
            raise ApiError(400, f"n is {req.n}; this server allows at most {s.max_n}.", param="n")
        requested = req.requested_tokens
        if requested is not None and requested > s.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {requested}; this server allows at most {s.max_tokens_limit}.",
                           param="max_tokens")
        out = []
        for i, prompt in enumerate(prompts):
            room = self.context - len(prompt)
            tokens = requested or min(default_tokens or s.max_tokens_limit, s.max_tokens_limit, room)
            if tokens > room or room < 1:
                raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                    f"requested {len(prompt) + tokens} tokens ({len(prompt)} in the prompt, {tokens} "
                                    "in the completion). Please reduce the prompt or max_tokens.",
                               param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                               code="context_length_exceeded")
            for j in range(req.n):
                index = i * req.n + j
                out.append(Choice(index, prompt, SamplingParams(
                    max_new_tokens=tokens, temperature=req.temperature, top_p=req.top_p,
                    stop_token_ids=() if req.ignore_eos else (self.eos,),
                    seed=None if req.seed is None else req.seed + index)))
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
                record("moeforge_serve_latency_seconds", time.perf_counter() - t0, model=self.metric_model,
                       route=route)
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

    @staticmethod
    def usage(prompts: list[list[int]], completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # ------------------------------------------------------------------------------------------------ endpoints

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        prompt = self.chat_prompt(req)
        choices = self.choices(req, [prompt], None)
        rid, created = new_id("chatcmpl"), now()
        head = {"id": rid, "created": created, "model": self.model_id, "system_fingerprint": self.fingerprint}
        if req.stream:
            return self._sse(choices, req, [prompt], {**head, "object": "chat.completion.chunk"}, chat=True)
        final, completion_tokens = await self.complete(choices, req.stops, CHAT)
        return {**head, "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": e.text},
                             "finish_reason": e.finish_reason, "logprobs": None} for i, e in sorted(final.items())],
                "usage": self.usage([prompt], completion_tokens)}

    async def completions(self, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        prompts = self.completion_prompts(req)
        choices = self.choices(req, prompts, req.max_tokens)
        head = {"id": new_id("cmpl"), "created": now(), "model": self.model_id,
                "system_fingerprint": self.fingerprint}
        if req.stream:
            return self._sse(choices, req, prompts, {**head, "object": "text_completion"}, chat=False)
        final, completion_tokens = await self.complete(choices, req.stops, COMPLETIONS)
        return {**head, "object": "text_completion",
                "choices": [{"index": i, "text": e.text, "finish_reason": e.finish_reason, "logprobs": None}
                            for i, e in sorted(final.items())],
                "usage": self.usage(prompts, completion_tokens)}

    @property
    def fingerprint(self) -> str:
        return f"moeforge-{self.source.name}-{self.source.version or 'local'}"

    async def _sse(self, choices: list[Choice], req, prompts: list[list[int]], head: dict[str, Any],
                   chat: bool) -> AsyncIterator[str]:
        """OpenAI's streaming format: one chunk per piece of text, a finish chunk per choice, usage, [DONE]."""
        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                body = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                body = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            extra = {"usage": None} if req.include_usage else {}
            return sse({**head, "choices": [body], **extra})

        total = 0
        if chat:
            for c in choices:
                yield chunk(c.index, None, None, role=True)
        try:
            # closing this generator (a client that went away) closes the events at once, freeing the slots
            async with contextlib.aclosing(self.events(choices, req.stops, CHAT if chat else COMPLETIONS)) as events:
                async for e in events:
                    if e.text:
                        yield chunk(e.index, e.text, None)
                    if e.finish_reason is not None:
                        total += e.completion_tokens
                        yield chunk(e.index, None, e.finish_reason)
            if req.include_usage:
                yield sse({**head, "choices": [], "usage": self.usage(prompts, total)})
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI-compatible servers do
            log.exception("stream failed")
            yield sse(ApiError(500, f"generation failed: {e}").body())
        yield "data: [DONE]\n\n"


class CountRequests:
    """ASGI middleware counting answered requests by route template and status (`moeforge_serve_requests`).

    Plain ASGI rather than `BaseHTTPMiddleware`, which would buffer streams and hide client disconnects.
    """

    def __init__(self, app, model: str):
        self.app, self.model = app, model

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                record("moeforge_serve_requests", 1, model=self.model, route=route, status=message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def create_app(server: ModelServer) -> FastAPI:
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /healthz, OpenAI-style errors."""
    app = FastAPI(title="moeforge", description="OpenAI-compatible API of a moeforge student")
    app.add_middleware(CountRequests, model=server.metric_model)

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "not JSON")
            return error(ApiError(400, f"The request body is not valid JSON: {detail}", code="invalid_json"))
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            problems.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return error(ApiError(400, "Invalid request: " + "; ".join(problems), param=param))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return error(ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, e: EngineError):
        return error(ApiError(503, f"The model is unavailable: {e}", type_="server_error"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception):
        log.exception("request failed")
        return error(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    def authorized(request: Request) -> None:
        server.check_api_key(request.headers.get("authorization"))

    async def respond(result):
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post(CHAT, dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest):
        return await respond(await server.chat(body))

    @app.post(COMPLETIONS, dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest):
        return await respond(await server.completions(body))

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [server.card()]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorized)])
    async def model(model: str):
        if not server.accepts(model):
            raise ApiError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return server.card()

    @app.get("/healthz")
    async def healthz():
        return server.health()

    return app
