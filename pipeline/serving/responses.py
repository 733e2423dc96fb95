"""A request's answer assembled from its generation events, in its endpoint's shape: whole, or as an SSE stream.

Both endpoints share these two paths; what a choice looks like in each is the `Shape`'s (`openai_format.py`).
Closing what either returns (a client that went away) closes the events at once, which frees the engine's slots.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from pipeline.serving.openai_format import DONE, ChunkWriter, Head, OpenAIResponse, Piece, Shape, Usage
from pipeline.serving.protocol import internal_error


@dataclass(frozen=True)
class Event:
    """Progress of one choice: new text, and its finish reason when it is the choice's last event (then also the
    choice's completion tokens, all of them)."""

    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int


async def whole(
    shape: Shape, head: Head, prompts: list[list[int]], events: AsyncGenerator[Event, None]
) -> OpenAIResponse:
    """Run to the end: every choice's whole text, in index order, and the usage of them all."""
    texts: dict[int, list[str]] = {}
    final: dict[int, Piece] = {}
    completion_tokens = 0
    async with contextlib.aclosing(events):
        async for e in events:
            texts.setdefault(e.index, []).append(e.text)
            if e.finish_reason is not None:
                final[e.index] = Piece(e.index, "".join(texts[e.index]), e.finish_reason)
                completion_tokens += e.completion_tokens
    return shape.response(head, [final[i] for i in sorted(final)], Usage.of(prompts, completion_tokens))


async def stream(
    writer: ChunkWriter, indices: list[int], prompts: list[list[int]], events: AsyncGenerator[Event, None]
) -> AsyncGenerator[str, None]:
    """OpenAI's streaming format: each choice's opening chunk (chat: the role), one chunk per piece of text, a
    finish chunk per choice, the usage if asked for, `[DONE]`. A failure once the headers are sent is reported
    in-band, as OpenAI-compatible servers do, and the stream still ends with `[DONE]`."""
    for index in indices:
        if (opening := writer.opening(index)) is not None:
            yield opening
    completion_tokens = 0
    try:
        async with contextlib.aclosing(events):
            async for e in events:
                if e.text:
                    yield writer.text(e.index, e.text)
                if e.finish_reason is not None:
                    completion_tokens += e.completion_tokens
                    yield writer.finish(e.index, e.finish_reason)
        if writer.include_usage:
            yield writer.usage(Usage.of(prompts, completion_tokens))
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
        yield writer.error(internal_error(e, f"stream {writer.head.id}", 500, "Generation failed"))
    yield DONE
