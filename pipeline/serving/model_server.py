"""One replica's request handling: the student, its continuous-batching engine, OpenAI requests in, typed OpenAI
responses (or SSE chunks) out.

`ModelServer` is a plain class: it loads the student and owns the `Engine`. A request, chat or text, takes one
path: checked against the deployment (`request_checks.py`: a `CheckedRequest`, one engine sequence per choice),
run in the engine, its tokens turned into text with stop strings cut (`TextStream`), and answered in the endpoint's
shape, whole or streamed (`responses.py`). `app.py` puts the FastAPI app around it; `actors/server.py` runs that
app as a Ray Serve deployment, and tests can also drive it in-process. Every error a client can cause is an
`ApiError` raised before any token is generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ServeConfig
from pipeline.metrics import record
from pipeline.model.generate import CompiledDecode, SamplingParams, generate
from pipeline.serving.auth import load_api_key, require_key
from pipeline.serving.engine import Engine, EngineError, StepOutput
from pipeline.serving.openai_format import ChunkWriter, Head, ModelCard, OpenAIResponse, now
from pipeline.serving.protocol import new_id
from pipeline.serving.request_checks import Choice, Request, RequestChecks
from pipeline.serving.responses import Event, stream, whole
from pipeline.serving.source import ModelSource, materialize
from pipeline.serving.text_stream import TextStream

log = logging.getLogger(__name__)


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
        student_dir = materialize(source, tracking_uri, cache_dir)
        student = Student(student_dir, self.device, settings.inference_dtype)
        self.precision = student.precision
        self.model, self.tokenizer = student.model, student.tokenizer
        engine = choose_engine(settings, self.model, self.device)
        self.eos = self.tokenizer.eos_token_id
        self.context = self.model.cfg.max_seq_len
        self.created = now()
        self.params = self.model.num_params()  # fixed for the replica's life: counted once, not per request
        s = source
        self.names = frozenset({s.name, s.uri, s.pinned_uri, f"{s.name}/{s.version}", f"{s.name}@{s.alias}"})
        self.checks = RequestChecks(
            settings,
            model_id=self.model_id,
            names=self.names,
            tokenizer=self.tokenizer,
            context=self.context,
            vocab_size=self.model.embed.num_embeddings,
            eos=self.eos,
            system_prompt=INSTRUCTION if settings.student_system_prompt else None,
        )
        if engine == "llama_cpp":
            from pipeline.serving.llama_cpp_runner import LlamaCppRunner, gguf_for

            gguf = gguf_for(student_dir, cache_dir, settings.gguf_quant)
            self.engine = Engine(LlamaCppRunner(gguf, settings.max_batch_size, self.context), settings.max_batch_size)
            self.dtype: str = settings.gguf_quant
        else:
            # one short generation first, so the first client does not pay for lazy initialisation
            generate(self.model, [self.tokenizer.encode("warm up") or [0]], SamplingParams(max_new_tokens=2))
            n = settings.compile_decode_max_batch
            compiled = CompiledDecode(self.model, n) if n else None
            self.engine = Engine(self.model, settings.max_batch_size, compiled=compiled)
            self.dtype = self.precision.name
        self.engine.compile_steps()
        log.info("serving %s on the %s engine (%s)", source.uri, self.engine.name, self.dtype)

    # ------------------------------------------------------------------------------------------------ info

    @property
    def model_id(self) -> str:
        return self.source.name

    def accepts(self, model: str) -> bool:
        return model in self.names

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
                "engine": self.engine.name,
                "device": self.device,
                "dtype": self.dtype,
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

    @property
    def fingerprint(self) -> str:
        return f"moeforge-{self.source.name}-{self.source.version or 'local'}"

    @property
    def metric_model(self) -> str:
        """The `model` tag of this replica's live metrics: name and version (or the directory's name)."""
        return f"{self.source.name}/{self.source.version}" if self.source.version else self.source.name

    def record_load(self) -> None:
        stats = self.engine.stats()
        record("moeforge_serve_queue_depth", stats["waiting"], model=self.metric_model)
        record("moeforge_serve_running", stats["running"], model=self.metric_model)

    # ------------------------------------------------------------------------------------------------ requests

    async def answer(self, req: Request) -> OpenAIResponse | AsyncGenerator[str, None]:
        """A chat or text completion request, checked, then answered whole or (`stream`) as SSE events."""
        checked = self.checks.check(req, waiting=self.engine.stats()["waiting"])
        shape = checked.endpoint.shape
        head = Head(new_id(shape.id_prefix), now(), self.model_id, self.fingerprint)
        events = self.events(checked.choices, checked.stops, checked.endpoint.route)
        if checked.stream:
            writer = ChunkWriter(head, shape, include_usage=checked.include_usage)
            return stream(writer, [c.index for c in checked.choices], checked.prompts, events)
        return await whole(shape, head, checked.prompts, events)

    async def events(self, choices: list[Choice], stops: list[str], route: str) -> AsyncGenerator[Event, None]:
        """Run every choice in the engine at once; yield their progress as it comes (each ends with a finish).

        Records the request's time to first token and generation latency (`route` tags them).
        """
        queue: asyncio.Queue[Event | Exception] = asyncio.Queue()
        metrics = _GenerationMetrics(self.metric_model, route)
        tasks = [asyncio.create_task(self._pump(c, stops, queue)) for c in choices]
        self.record_load()
        finished = False
        try:
            remaining = len(tasks)
            while remaining:
                event = await queue.get()
                if isinstance(event, Exception):
                    raise event
                metrics.saw(event)
                if event.finish_reason is not None:
                    remaining -= 1
                yield event
            finished = True
        finally:  # a disconnected client or an error: stop every choice still running
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            metrics.done(finished)
            self.record_load()

    async def _pump(self, choice: Choice, stops: list[str], queue: asyncio.Queue[Event | Exception]) -> None:
        """One choice's progress into `queue`, up to its finish, or the error that ends the request."""
        text = TextStream(self.tokenizer, stops, {self.eos})
        n = 0
        try:
            async with contextlib.aclosing(self.engine.stream(choice.prompt, choice.params)) as outputs:
                async for out in outputs:
                    if out.token is not None:
                        n += 1
                    event = _progress(choice.index, text, out, n)
                    if event is not None:
                        queue.put_nowait(event)
                    if event is not None and event.finish_reason is not None:
                        return  # leaving the loop closes the stream, which frees the slot
        except Exception as e:  # noqa: BLE001 - delivered to the request, which answers with an error
            queue.put_nowait(e)


def choose_engine(settings: ServeConfig, model, device: str) -> str:
    """The engine `settings.engine` names, checked it can run `model`; `auto`: llama_cpp where it can (a CPU, the
    extra installed, the standard layout), else moeforge. Raises `ConfigError` saying why a named one cannot."""
    from pipeline.export import ExportError, check_engine_layout
    from pipeline.serving.llama_cpp_runner import llama_cpp_installed
    from pipeline.validation import ConfigError

    if settings.engine == "moeforge":
        return "moeforge"
    why = None
    if device != "cpu":
        why = f"it runs on the CPU here, and this replica has {device}"
    elif not llama_cpp_installed():
        why = "llama-cpp-python is not installed: pip install 'moeforge[llamacpp]'"
    else:
        try:
            check_engine_layout(model)
        except ExportError as e:
            why = str(e)
    if why is None:
        return "llama_cpp"
    if settings.engine == "llama_cpp":
        raise ConfigError(f"serve.engine llama_cpp cannot run this student: {why}")
    return "moeforge"


def _progress(index: int, text: TextStream, out: StepOutput, completion_tokens: int) -> Event | None:
    """What one engine output means for choice `index`: new text, its finish (a stop string reached first, else
    the engine's reason), or nothing to tell yet."""
    delta, hit = text.add(out.token) if out.token is not None else ("", False)
    if hit:
        return Event(index, delta, "stop", completion_tokens)
    if out.finish_reason == "abort":
        raise EngineError("the engine stopped before the sequence finished")
    if out.finish_reason is not None:
        return Event(index, delta + text.flush(), out.finish_reason, completion_tokens)
    return Event(index, delta, None, completion_tokens) if delta else None


@dataclass
class _GenerationMetrics:
    """One request's generation metrics: time to first token, latency (when it ran to the end), tokens generated."""

    model: str
    route: str
    t0: float = field(default_factory=time.perf_counter)
    first: float | None = None
    tokens: int = 0

    def saw(self, event: Event) -> None:
        if self.first is None and event.completion_tokens:
            self.first = time.perf_counter() - self.t0
            record("moeforge_serve_ttft_seconds", self.first, model=self.model, route=self.route)
        if event.finish_reason is not None:
            self.tokens += event.completion_tokens

    def done(self, finished: bool) -> None:
        if finished:
            record("moeforge_serve_latency_seconds", time.perf_counter() - self.t0, model=self.model, route=self.route)
        record("moeforge_serve_generated_tokens", self.tokens, model=self.model)
