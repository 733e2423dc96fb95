"""What a completion request must pass before any token is generated, and the checked request it becomes.

A parsed request (field types, ranges and lengths are `protocol.py`'s) is checked here against the deployment, in
this order: the engine sequences it asks for (prompts x n) against the per-request cap and the room in the
engine's queue, before any prompt is tokenized; its prompts (the chat template, empty prompts, token ids outside
the vocabulary); the model it names; `n`; `max_tokens`; and each prompt's room in the context. What passes is a
`CheckedRequest`: one engine `Choice` per (prompt, n), each with its own sampling. Every failure is an `ApiError`
carrying the status and body the client gets.

Chat and text completions go through the same checks. What differs is data (`Endpoint`: the route, the field
that holds the prompt, the shape of the answers) and how the prompts are built (a conversation in the model's
chat template, or each completions prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import ServeConfig
from pipeline.model.generate import SamplingParams
from pipeline.serving.openai_format import CHAT_SHAPE, TEXT_SHAPE, Shape
from pipeline.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest

Request = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class Endpoint:
    """One completion route, as data: its path (also the `route` tag of its metrics), the request field holding the
    prompt (what a context-length error names), and how its answers are shaped."""

    route: str
    prompt_field: str
    shape: Shape


CHAT = Endpoint("/v1/chat/completions", "messages", CHAT_SHAPE)
COMPLETIONS = Endpoint("/v1/completions", "prompt", TEXT_SHAPE)


@dataclass(frozen=True)
class Choice:
    """One engine sequence of a request: which choice it is, its prompt and sampling."""

    index: int
    prompt: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check: its endpoint, prompts (token ids), engine sequences, and how to answer."""

    endpoint: Endpoint
    prompts: list[list[int]]
    choices: list[Choice]
    stops: list[str]
    stream: bool
    include_usage: bool


class RequestChecks:
    """The checks of one deployment (its limits, its model's names, context and vocabulary, its tokenizer).

    Args:
        settings: the `serve` config section (`max_n`, `max_tokens_limit`, `max_sequences_per_request`,
            `max_waiting_sequences`).
        model_id: the id clients are told to send.
        names: every model name a request may send for the served model.
        tokenizer: the model's tokenizer (chat template, encoding of text prompts).
        context: tokens per sequence, prompt and completion together.
        vocab_size: token ids a prompt may hold are [0, vocab_size).
        eos: the end-of-sequence token, a stop token unless a request sets `ignore_eos`.
        system_prompt: the system message put before a conversation that has none; None: nothing added.
    """

    def __init__(
        self,
        settings: ServeConfig,
        *,
        model_id: str,
        names: frozenset[str],
        tokenizer: Any,
        context: int,
        vocab_size: int,
        eos: int,
        system_prompt: str | None,
    ):
        self.settings, self.model_id, self.names = settings, model_id, names
        self.tokenizer, self.context, self.vocab_size = tokenizer, context, vocab_size
        self.eos, self.system_prompt = eos, system_prompt

    def check(self, req: Request, waiting: int) -> CheckedRequest:
        """`req` checked against this deployment, with `waiting` sequences already queued in the engine."""
        self.sequences(req.prompt_count, req.n, waiting)  # before tokenizing what may be a huge list of prompts
        endpoint: Endpoint
        if isinstance(req, ChatCompletionRequest):
            endpoint, prompts = CHAT, [self.chat_prompt(req)]
        else:
            endpoint, prompts = COMPLETIONS, self.completion_prompts(req)
        self.model(req.model)
        if req.n > self.settings.max_n:
            raise ApiError(400, f"n is {req.n}; this server allows at most {self.settings.max_n}.", param="n")
        requested = self.max_tokens(req.requested_tokens)
        choices = []
        for i, prompt in enumerate(prompts):
            tokens = self.completion_tokens(prompt, requested, endpoint.prompt_field)
            choices += [self.choice(req, i * req.n + j, prompt, tokens) for j in range(req.n)]
        return CheckedRequest(endpoint, prompts, choices, req.stops, req.stream, req.include_usage)

    # ------------------------------------------------------------------------------------------------ limits

    def sequences(self, n_prompts: int, n: int, waiting: int) -> None:
        """A request's engine sequences (prompts x n) within the per-request cap, and room for them in the queue."""
        s = self.settings
        if n_prompts * n > s.max_sequences_per_request:
            raise ApiError(
                400,
                f"{n_prompts} prompt(s) x n={n} asks for {n_prompts * n} sequences; this server "
                f"allows at most {s.max_sequences_per_request} per request.",
                param="prompt" if n == 1 else "n",
            )
        if waiting + n_prompts * n > s.max_waiting_sequences:
            raise ApiError(
                503,
                f"The server is busy ({waiting} sequences waiting); retry shortly.",
                type_="server_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            )

    def model(self, model: str) -> None:
        if model not in self.names:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_id}'.",
                param="model",
                code="model_not_found",
            )

    def max_tokens(self, requested: int | None) -> int | None:
        """The completion tokens a request asked for (None: as many as fit), within `max_tokens_limit`."""
        limit = self.settings.max_tokens_limit
        if requested is not None and requested > limit:
            raise ApiError(400, f"max_tokens is {requested}; this server allows at most {limit}.", param="max_tokens")
        return requested

    def completion_tokens(self, prompt: list[int], requested: int | None, field: str) -> int:
        """The completion tokens of one prompt: as requested, else as many as fit (at most `max_tokens_limit`);
        a prompt that leaves no room for them is a context-length error naming `field`."""
        room = self.context - len(prompt)
        tokens = requested or min(self.settings.max_tokens_limit, room)
        if tokens > room or room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context} tokens. However, you "
                f"requested {len(prompt) + tokens} tokens ({len(prompt)} in the prompt, {tokens} "
                "in the completion). Please reduce the prompt or max_tokens.",
                param=field,
                code="context_length_exceeded",
            )
        return tokens

    def choice(self, req: Request, index: int, prompt: list[int], tokens: int) -> Choice:
        """Choice `index` of `req`: a request's seed is choice 0's, choice i samples with seed + i."""
        params = SamplingParams(
            max_new_tokens=tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop_token_ids=() if req.ignore_eos else (self.eos,),
            seed=None if req.seed is None else req.seed + index,
        )
        return Choice(index, prompt, params)

    # ------------------------------------------------------------------------------------------------ prompts

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        """The conversation in the model's chat template (`developer` is `system`), after the system prompt when
        the conversation does not start with a system message of its own."""
        from pipeline.data.prompts import chat_token_ids

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            return chat_token_ids(self.tokenizer, messages)
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation is the client's error
            raise ApiError(400, f"messages do not fit the model's chat template: {e}", param="messages") from None

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """Each prompt as token ids: text encoded without special tokens, token ids checked against the vocabulary."""
        prompts = []
        for p in req.prompts:
            ids = self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p)
            if not ids:
                raise ApiError(400, "prompt is empty after tokenization", param="prompt")
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
            prompts.append(ids)
        return prompts
