"""OpenAI API responses, typed: chat completions, text completions, their streamed chunks, model cards.

The server builds these models and serialises them; nothing else writes OpenAI's response JSON by hand. The two
completion endpoints differ only in how a choice is shaped (`ChatShape`, `TextShape`); `responses.py` assembles
either from a request's generation events. Streams use Server-Sent Events: one chunk per piece of text, a finish
chunk per choice, an optional usage chunk, then `data: [DONE]`. Fields this server never fills (`logprobs`) are
present as null, as OpenAI sends them.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, model_serializer

from pipeline.serving.protocol import ApiError

DONE = "data: [DONE]\n\n"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompts: list[list[int]], completion_tokens: int) -> Usage:
        prompt_tokens = sum(len(p) for p in prompts)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class OpenAIResponse(BaseModel):
    """What every completion response and chunk starts with."""

    id: str
    created: int
    model: str
    system_fingerprint: str


# ---------------------------------------------------------------------------------------------------- chat


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(OpenAIResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """A chunk's increment: only the fields it carries (the first has the role, the last none)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(OpenAIResponse):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------------------- completions


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class TextCompletion(OpenAIResponse):
    """A text completion, whole or as one streamed chunk (OpenAI uses one object type for both)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeforge"
    root: str
    max_model_len: int
    moeforge: dict[str, Any]  # registry name, version, alias, run, parameters, device, batch size


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Head:
    """What every response and chunk of one request starts with."""

    id: str
    created: int
    model: str
    system_fingerprint: str


@dataclass(frozen=True)
class Piece:
    """One choice's part of an answer in either endpoint's terms: its text (all of it in a whole response, the new
    part in a chunk) and its finish reason once it has one."""

    index: int
    text: str
    finish_reason: str | None = None


class Shape(ABC):
    """How one endpoint shapes its answers: the prefix of its ids, a whole response, a streamed chunk, and the chunk
    that opens each streamed choice, if any. Everything else about answering is the same for both endpoints."""

    id_prefix: ClassVar[str]

    @abstractmethod
    def response(self, head: Head, choices: list[Piece], usage: Usage) -> OpenAIResponse: ...

    @abstractmethod
    def chunk(self, head: Head, choices: list[Piece], usage: Usage | None = None) -> OpenAIResponse: ...

    def opening(self, head: Head, index: int) -> OpenAIResponse | None:
        return None


class ChatShape(Shape):
    """Chat completions: a choice is an assistant message; a stream opens each choice with the assistant role and
    then carries deltas (the finish chunk's delta is empty)."""

    id_prefix = "chatcmpl"

    def response(self, head: Head, choices: list[Piece], usage: Usage) -> ChatCompletion:
        return ChatCompletion(
            **asdict(head),
            choices=[
                ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                for c in choices
            ],
            usage=usage,
        )

    def chunk(self, head: Head, choices: list[Piece], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            **asdict(head),
            choices=[
                ChatChunkChoice(index=c.index, delta=ChatDelta(content=c.text or None), finish_reason=c.finish_reason)
                for c in choices
            ],
            usage=usage,
        )

    def opening(self, head: Head, index: int) -> ChatCompletionChunk:
        """A choice's first chunk: the assistant role and empty content."""
        choice = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
        return ChatCompletionChunk(**asdict(head), choices=[choice])


class TextShape(Shape):
    """Text completions: a choice is its text, whole or in pieces (one object type for responses and chunks)."""

    id_prefix = "cmpl"

    def response(self, head: Head, choices: list[Piece], usage: Usage) -> TextCompletion:
        return self.chunk(head, choices, usage)

    def chunk(self, head: Head, choices: list[Piece], usage: Usage | None = None) -> TextCompletion:
        return TextCompletion(
            **asdict(head),
            choices=[CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason) for c in choices],
            usage=usage,
        )


CHAT_SHAPE, TEXT_SHAPE = ChatShape(), TextShape()


# ---------------------------------------------------------------------------------------------------- streams


def sse(payload: BaseModel | dict[str, Any], drop: tuple[str, ...] = ()) -> str:
    """One Server-Sent Event carrying `payload` as compact JSON (without the top-level keys in `drop`)."""
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    for key in drop:
        data.pop(key, None)
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class ChunkWriter:
    """The SSE events of one streamed request, in its endpoint's shape.

    Every chunk carries `"usage": null` when the client asked for usage (`stream_options.include_usage`), and no
    usage key otherwise; the usage itself comes in a last chunk with no choices.
    """

    head: Head
    shape: Shape
    include_usage: bool

    def _event(self, chunk: OpenAIResponse) -> str:
        return sse(chunk, drop=() if self.include_usage else ("usage",))

    def opening(self, index: int) -> str | None:
        """The event that opens a choice's stream (chat: the assistant role), or None where the shape has none."""
        chunk = self.shape.opening(self.head, index)
        return None if chunk is None else self._event(chunk)

    def text(self, index: int, text: str) -> str:
        return self._event(self.shape.chunk(self.head, [Piece(index, text)]))

    def finish(self, index: int, reason: str) -> str:
        return self._event(self.shape.chunk(self.head, [Piece(index, "", reason)]))

    def usage(self, usage: Usage) -> str:
        return self._event(self.shape.chunk(self.head, [], usage))

    @staticmethod
    def error(e: ApiError) -> str:
        """An error after the headers were sent: reported in-band, as OpenAI-compatible servers do."""
        return sse(e.body())
