"""OpenAI API requests: what clients send to /v1/chat/completions and /v1/completions, and the errors they get back.

What the server answers is typed in `openai_format.py`.

Request models validate types strictly (no "10" for 10, no `true` for 1) and ranges (a violation is a 400 in
OpenAI's error JSON, see `app.py`); limits that depend on the deployment (body bytes, max `n`, max `max_tokens`,
sequences per request, the context length) are checked by the app and the server. Fields OpenAI defines that this
server does not implement are accepted only at their neutral value, so a client never gets silently different
behaviour. `ignore_eos` is vLLM's extension (benchmarks use it for fixed-length outputs).

What one request can make the server hold or scan is capped field by field, so no field is left to the body-size
cap alone: every string and every list a client sends has a maximum length below.
"""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Per-field caps. Names (model, user, a message's name) are identifiers; a stop string longer than a few hundred
# characters can never match within max_tokens; a text (a message's content, a prompt) or a token prompt above 64k
# characters/ids is beyond the context of any model this server runs, and is refused before it is tokenized.
MAX_NAME_CHARS = 256
MAX_STOP_CHARS = 256
MAX_STOPS = 4  # OpenAI's own limit
MAX_TEXT_CHARS = 65_536
MAX_PROMPT_TOKENS = 65_536
MAX_MESSAGES = 256  # messages of one conversation
MAX_CONTENT_PARTS = 64  # text parts of one message
MAX_PROMPTS = 4_096  # prompts of one completions request (the sequence cap, a deployment setting, is lower)
MAX_TOKEN_ID = 2**31 - 1  # ids are checked against the model's vocabulary later; this bounds the parse

Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
TokenIds = Annotated[
    list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)
]


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}  # e.g. Retry-After on a 503

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    """JSON types as OpenAI documents them: a number where a number is due, a boolean where a boolean is."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: Name | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: Name = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: (
        Annotated[str, Field(max_length=MAX_STOP_CHARS)]
        | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOPS)]
        | None
    ) = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI documents it
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Name | None = None
    ignore_eos: bool = False  # vLLM extension

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not supported by this server; send 0 or leave it out")
        return v

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])  # normalised by the validator

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported by this server")
        return v

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def prompt_count(self) -> int:
        return 1  # the conversation


class CompletionRequest(_Sampling):
    prompt: Text | TokenIds | Annotated[list[Text] | list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: Name | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        for name, neutral in (("echo", False), ("suffix", None), ("logprobs", None)):
            if getattr(self, name) != neutral:
                raise ValueError(f"{name} is not supported by this server")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of other than n is not supported by this server")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        token_ids = [x for x in p if isinstance(x, int)]  # validated: all of p's items are ints (one prompt) or none
        if token_ids:
            return [token_ids]
        return [x for x in p if not isinstance(x, int)]

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def prompt_count(self) -> int:
        return len(self.prompts)


def new_id(prefix: str) -> str:
    """A fresh id for a response, a stream or a request (`<prefix>-<32 hex>`)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def internal_error(e: BaseException, where: str, status: int, what: str) -> ApiError:
    """An unexpected failure as the client sees it: `what` and a new request id, nothing of the exception.

    The exception is logged under that id, so an operator can find the details the client was not shown.
    """
    rid = new_id("req")
    logging.getLogger(__name__).error("%s failed (request id %s): %s: %s", where, rid, type(e).__name__, e, exc_info=e)
    return ApiError(status, f"{what} (request id {rid}).", type_="server_error")
