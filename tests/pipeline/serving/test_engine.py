"""Continuous batching: sequences that join and leave a running batch get exactly what they would get alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pipeline.model.config import model_preset
from pipeline.model.generate import SamplingParams, generate
from pipeline.model.transformer import Transformer
from pipeline.serving.engine import Engine, EngineError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(model_preset("toy", vocab_size=200)).eval()


async def collect(engine: Engine, prompt, params, delay: float = 0.0):
    await asyncio.sleep(delay)
    tokens, reasons = [], []
    async for out in engine.stream(prompt, params):
        if out.token is not None:
            tokens.append(out.token)
        reasons.append(out.finish_reason)
    return tokens, reasons[-1]


def test_staggered_sequences_match_generating_each_alone(model):
    """Five sequences through two slots, arriving at different times: greedy and seeded-sampled rows alike are
    token-for-token what `generate` gives each one alone, so joining a batch changes nothing."""
    prompts = [[1, 2, 3], [10, 11, 12, 13, 14, 15, 16], [99], [7, 7], [42, 5, 6, 8]]
    params = [
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=5),
        SamplingParams(max_new_tokens=9, temperature=1.3, seed=11),
        SamplingParams(max_new_tokens=14),
        SamplingParams(max_new_tokens=7, temperature=0.8, top_p=0.9, seed=3),
    ]
    engine = Engine(model, max_batch_size=2)

    async def main():
        return await asyncio.gather(
            *(collect(engine, p, s, delay=0.01 * i) for i, (p, s) in enumerate(zip(prompts, params, strict=True)))
        )

    try:
        results = asyncio.run(main())
        for p, s, (tokens, reason) in zip(prompts, params, results, strict=True):
            alone = generate(model, [p], s)[0]
            assert tokens == alone.tokens and reason == alone.finish_reason == "length"
        assert engine.stats()["free_slots"] == 2 and engine.stats()["running"] == 0
        assert engine.steps < sum(s.max_new_tokens for s in params)  # steps were shared
    finally:
        engine.stop()


def test_a_stop_token_ends_only_its_own_sequence(model):
    engine = Engine(model, max_batch_size=4)
    greedy = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=10))[0].tokens
    stop_at = greedy[3]

    async def main():
        return await asyncio.gather(
            collect(engine, [1, 2, 3], SamplingParams(max_new_tokens=10, stop_token_ids=(stop_at,))),
            collect(engine, [1, 2, 3], SamplingParams(max_new_tokens=10)),
        )

    try:
        (stopped, r1), (full, r2) = asyncio.run(main())
        assert stopped == greedy[: greedy.index(stop_at) + 1] and r1 == "stop"
        assert full == greedy and r2 == "length"
    finally:
        engine.stop()


def test_closing_a_stream_early_frees_its_slot_for_the_next_sequence(model):
    engine = Engine(model, max_batch_size=1)

    async def main():
        stream = engine.stream([1, 2], SamplingParams(max_new_tokens=200))
        got = [await anext(stream) for _ in range(3)]
        await stream.aclose()  # a client that went away
        # the only slot was taken; the next sequence can only run once the first one's slot is free
        tokens, reason = await asyncio.wait_for(collect(engine, [3, 4], SamplingParams(max_new_tokens=4)), 30)
        return got, tokens, reason

    try:
        got, tokens, reason = asyncio.run(main())
        assert len(got) == 3 and len(tokens) == 4 and reason == "length"
        assert engine.stats()["running"] == 0 and engine.stats()["free_slots"] == 1
        assert engine.tokens_generated < 200  # the abandoned sequence did not run to its end
    finally:
        engine.stop()


def test_a_failing_step_fails_its_sequences_and_the_engine_keeps_serving(model):
    """A token id outside the vocabulary makes the forward pass raise: that request gets the error, later
    requests are served normally."""
    engine = Engine(model, max_batch_size=2)

    async def main():
        with pytest.raises(EngineError, match=r"IndexError|index"):
            await collect(engine, [1, 10_000], SamplingParams(max_new_tokens=3))
        return await collect(engine, [1, 2], SamplingParams(max_new_tokens=3))

    try:
        tokens, _reason = asyncio.run(main())
        assert tokens == generate(model, [[1, 2]], SamplingParams(max_new_tokens=3))[0].tokens
        assert engine.alive and engine.stats()["free_slots"] == 2
    finally:
        engine.stop()


def test_requests_over_the_context_are_refused_before_queueing(model):
    engine = Engine(model, max_batch_size=1, max_len=16)
    try:
        with pytest.raises(ValueError, match="exceeds the context of 16"):
            engine.submit(list(range(10)), SamplingParams(max_new_tokens=7), loop=asyncio.new_event_loop())
        with pytest.raises(ValueError, match="empty prompt"):
            engine.submit([], SamplingParams(), loop=asyncio.new_event_loop())
    finally:
        engine.stop()
    with pytest.raises(EngineError, match="not running"):
        engine.submit([1], SamplingParams(max_new_tokens=2), loop=asyncio.new_event_loop())


@pytest.mark.slow  # compiles
@pytest.mark.timeout(300)
def test_an_engine_with_a_compiled_step_compiles_before_serving_and_answers_as_the_eager_one(model):
    """`compile_steps` compiles every covered batch size on the engine's own cache and leaves its slots free; the
    requests then take the compiled step at batch 1 and give what `generate` gives each alone."""
    from pipeline.model.generate import CompiledDecode

    compiled = CompiledDecode(model, max_batch=1)
    engine = Engine(model, max_batch_size=2, compiled=compiled)
    try:
        engine.compile_steps()
        assert compiled.compiled_steps == 2 and engine.stats()["free_slots"] == 2  # steps 2 and 3 of the warm-up
        prompts, greedy = [[1, 2, 3], [99, 4]], SamplingParams(max_new_tokens=8)
        for p in prompts:  # one at a time: batch 1, the compiled size
            tokens, reason = asyncio.run(collect(engine, p, greedy))
            assert tokens == generate(model, [p], greedy)[0].tokens and reason == "length"
        assert compiled.compiled_steps == 2 + 2 * 7  # every decode step of both requests (the first token is prefill's)
    finally:
        engine.stop()
