"""Answers assembled from generation events (`pipeline/serving/responses.py`), without a model or a server: the
events come from plain async generators, what comes out is parsed as the official `openai` client parses it."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from pipeline.serving.openai_format import CHAT_SHAPE, TEXT_SHAPE, ChunkWriter, Head
from pipeline.serving.responses import Event, stream, whole

HEAD = Head("cmpl-1", 1700000000, "test-student", "moeforge-test-student-1")
PROMPTS = [[1, 2, 3], [4, 5]]

# two choices, interleaved as the engine delivers them; choice 1 ends first
EVENTS = [
    Event(0, "Hel", None, 1),
    Event(1, "Wor", None, 1),
    Event(1, "ld", "stop", 2),
    Event(0, "lo", None, 2),
    Event(0, "", "length", 3),
]


async def events(items=EVENTS, fail: BaseException | None = None, closed: list | None = None):
    try:
        for e in items:
            await asyncio.sleep(0)
            yield e
        if fail is not None:
            raise fail
    finally:
        if closed is not None:
            closed.append(True)


def run(coro):
    return asyncio.run(coro)


def collect(writer: ChunkWriter, source) -> list[str]:
    async def main():
        return [e async for e in stream(writer, [0, 1], PROMPTS, source)]

    return run(main())


def payloads(lines: list[str]) -> list[dict]:
    assert lines[-1] == "data: [DONE]\n\n" and all(
        line.startswith("data: ") and line.endswith("\n\n") for line in lines
    )
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def test_a_whole_chat_completion_joins_each_choices_text_in_index_order():
    r = run(whole(CHAT_SHAPE, HEAD, PROMPTS, events()))
    parsed = ChatCompletion.model_validate(r.model_dump(mode="json"))
    assert [(c.index, c.message.role, c.message.content, c.finish_reason) for c in parsed.choices] == [
        (0, "assistant", "Hello", "length"),
        (1, "assistant", "World", "stop"),
    ]
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens, parsed.usage.total_tokens) == (5, 5, 10)
    assert (parsed.id, parsed.object, parsed.system_fingerprint) == (
        "cmpl-1",
        "chat.completion",
        HEAD.system_fingerprint,
    )


def test_a_whole_text_completion_has_the_same_choices_as_text():
    r = run(whole(TEXT_SHAPE, HEAD, PROMPTS, events()))
    parsed = Completion.model_validate(r.model_dump(mode="json"))
    assert [(c.index, c.text, c.finish_reason) for c in parsed.choices] == [
        (0, "Hello", "length"),
        (1, "World", "stop"),
    ]
    assert parsed.object == "text_completion" and parsed.usage.total_tokens == 10
    assert r.model_dump(mode="json")["choices"][0]["logprobs"] is None  # present as null, as OpenAI sends it


def test_a_chat_stream_opens_each_choice_with_the_role_then_deltas_then_finishes():
    chunks = payloads(collect(ChunkWriter(HEAD, CHAT_SHAPE, include_usage=False), events()))
    assert all("usage" not in c for c in chunks)  # not asked for: no usage key at all
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert all(c.object == "chat.completion.chunk" and c.id == "cmpl-1" for c in parsed)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    texts = {0: "", 1: ""}
    for c in parsed[2:]:
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
    assert texts == {0: "Hello", 1: "World"}
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"], c["choices"][0]["delta"]) for c in chunks]
    assert [f for f in finishes if f[1]] == [(1, "stop", {}), (0, "length", {})]


def test_a_text_stream_has_no_opening_and_usage_comes_last_when_asked_for():
    chunks = payloads(collect(ChunkWriter(HEAD, TEXT_SHAPE, include_usage=True), events()))
    assert all(c["object"] == "text_completion" and c["id"] == "cmpl-1" for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []  # asked for: null until then
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert [c["choices"] for c in chunks[:-1]] == [
        [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}]
        for i, text, reason in [
            (0, "Hel", None),
            (1, "Wor", None),
            (1, "ld", None),
            (1, "", "stop"),
            (0, "lo", None),
            (0, "", "length"),
        ]
    ]


def test_a_failure_mid_stream_is_reported_in_band_without_its_details_and_the_stream_still_ends():
    closed: list = []
    lines = collect(
        ChunkWriter(HEAD, TEXT_SHAPE, include_usage=True),
        events(EVENTS[:2], fail=RuntimeError("CUDA error at /srv/secret"), closed=closed),
    )
    chunks = payloads(lines)
    error = chunks[-1]["error"]
    assert error["type"] == "server_error" and "request id req-" in error["message"]
    assert "secret" not in "".join(lines) and closed == [True]
    assert all(c["choices"] for c in chunks[:-1])  # no usage chunk for a failed request


@pytest.mark.parametrize("shape", [CHAT_SHAPE, TEXT_SHAPE], ids=["chat", "text"])
def test_closing_the_stream_early_closes_the_events(shape):
    """A client that goes away: its stream is closed, and the events (the engine's sequences) with it."""
    closed: list = []

    async def main():
        out = stream(ChunkWriter(HEAD, shape, include_usage=False), [0, 1], PROMPTS, events(closed=closed))
        got = [await anext(out) for _ in range(3)]
        await out.aclose()
        return got

    assert len(run(main())) == 3 and closed == [True]
