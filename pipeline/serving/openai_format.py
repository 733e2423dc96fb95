"""OpenAI API responses, typed: chat completions, text completions, their streamed chunks, model cards.

The server builds these models and serialises them; nothing else writes OpenAI's response JSON by hand. Streams
use Server-Sent Events: one chunk per piece of text, a finish chunk per choice, an optional usage chunk, then
`data: [DONE]`. Fields this server never fills (`logprobs`) are present as null, as OpenAI sends them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

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


class _Response(BaseModel):
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


class ChatCompletion(_Response):
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


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------------------- completions


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class TextCompletion(_Response):
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


# ---------------------------------------------------------------------------------------------------- streams


def sse(payload: BaseModel | dict[str, Any], drop: tuple[str, ...] = ()) -> str:
    """One Server-Sent Event carrying `payload` as compact JSON (without the top-level keys in `drop`)."""
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    for key in drop:
        data.pop(key, None)
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclass
class ChunkWriter:
    """The SSE events of one streamed request: chat chunks or text-completion chunks with a shared head.

    Every chunk carries `"usage": null` when the client asked for usage (`stream_options.include_usage`), and no
    usage key otherwise; the usage itself comes in a last chunk with no choices.
    """

    id: str
    created: int
    model: str
    system_fingerprint: str
    chat: bool
    include_usage: bool

    def _event(self, choices: list, usage: Usage | None = None) -> str:
        cls = ChatCompletionChunk if self.chat else TextCompletion
        chunk = cls(
            id=self.id,
            created=self.created,
            model=self.model,
            system_fingerprint=self.system_fingerprint,
            choices=choices,
            usage=usage,
        )
        return sse(chunk, drop=() if self.include_usage else ("usage",))

    def role(self, index: int) -> str:
        """A chat stream's first chunk for a choice: the assistant role and empty content."""
        return self._event([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])

    def text(self, index: int, text: str) -> str:
        if self.chat:
            return self._event([ChatChunkChoice(index=index, delta=ChatDelta(content=text))])
        return self._event([CompletionChoice(index=index, text=text)])

    def finish(self, index: int, reason: str) -> str:
        if self.chat:
            return self._event([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason)])
        return self._event([CompletionChoice(index=index, text="", finish_reason=reason)])

    def usage(self, usage: Usage) -> str:
        return self._event([], usage)

    @staticmethod
    def error(e: ApiError) -> str:
        """An error after the headers were sent: reported in-band, as OpenAI-compatible servers do."""
        return sse(e.body())
