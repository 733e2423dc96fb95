from __future__ import annotations

import pytest
import torch

from pipeline.model.config import model_preset
from pipeline.model.generate import SamplingParams, generate
from pipeline.model.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(model_preset("toy", vocab_size=200)).eval()


def test_ragged_batch_equals_one_at_a_time(model):
    prompts = [[1, 2, 3], [10, 11, 12, 13, 14, 15, 16], [99]]
    batched = generate(model, prompts, SamplingParams(max_new_tokens=12))
    for p, b in zip(prompts, batched, strict=True):
        assert generate(model, [p], SamplingParams(max_new_tokens=12))[0].tokens == b.tokens
        assert len(b.tokens) == 12 and b.finish_reason == "length"


def test_seeded_sampling_is_reproducible_per_row(model):
    hot = SamplingParams(max_new_tokens=16, temperature=1.5, seed=7)
    a = generate(model, [[1, 2], [3]], [hot, SamplingParams(max_new_tokens=16, temperature=1.5, seed=8)])
    b = generate(model, [[1, 2]], hot)
    assert a[0].tokens == b[0].tokens  # a row's stream does not depend on its batch-mates
    c = generate(model, [[1, 2]], SamplingParams(max_new_tokens=16, temperature=1.5, seed=9))
    assert c[0].tokens != a[0].tokens


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, [[5, 6]], SamplingParams(max_new_tokens=8))[0].tokens
    for narrow in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = generate(model, [[5, 6]], SamplingParams(max_new_tokens=8, temperature=2.0, seed=1, **narrow))
        assert sampled[0].tokens == greedy, narrow


def test_stop_tokens_end_a_row_early(model):
    greedy = generate(model, [[5, 6]], SamplingParams(max_new_tokens=8))[0].tokens
    stop = greedy[3]
    first = greedy.index(stop)
    out = generate(model, [[5, 6], [7]], SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))
    assert out[0].tokens == greedy[: first + 1] and out[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_p=0), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k must be >= 0"),
    ],
)
def test_bad_sampling_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_follows_the_tempered_distribution_and_its_filters():
    from pipeline.model.generate import sample

    logits_BV = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)

    def freq(**kw):
        params = [SamplingParams(**kw)] * len(logits_BV)
        counts = torch.bincount(torch.tensor(sample(logits_BV, params, [g] * len(logits_BV))), minlength=5)
        return counts.float() / len(logits_BV)

    torch.testing.assert_close(freq(temperature=1.0), logits_BV[0].softmax(-1), atol=0.03, rtol=0)
    torch.testing.assert_close(freq(temperature=2.0), (logits_BV[0] / 2).softmax(-1), atol=0.03, rtol=0)
    top2 = freq(temperature=1.0, top_k=2)
    assert top2[:2].sum() == 0 and top2[4] == 0 and abs(top2[3] - 1 / (1 + torch.e**-1)) < 0.03
    # top_p 0.9: the smallest prefix of (0.64, 0.24, 0.09, ...) reaching 0.9 is the top three tokens
    nucleus = freq(temperature=1.0, top_p=0.9)
    assert nucleus[0] == 0 and nucleus[4] == 0 and nucleus[1] > 0


@pytest.mark.slow  # compiles
@pytest.mark.timeout(600)
def test_the_compiled_decode_step_gives_the_eager_logits_and_follows_changed_weights():
    """Compiled steps (batch 1; batch 3 stays eager past max_batch 2) against the eager path, also when every
    weight changes in place between two decode steps (as an optimizer step or a weight sync changes them)."""
    from pipeline.model.generate import CompiledDecode, decode, prefill

    torch.manual_seed(0)
    model = Transformer(model_preset("toy", vocab_size=200, n_layers=2)).eval()
    compiled = CompiledDecode(model, max_batch=2)

    def scale_weights(factor: float) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(factor)  # powers of two: undone exactly

    def steps(batch: int, step: CompiledDecode | None, change_at: int | None = None) -> torch.Tensor:
        cache = model.new_cache(batch, max_len=32)
        slots = [cache.allocate() for _ in range(batch)]
        logits = prefill(model, cache, slots, [[5, 6, 7, 8][: 2 + b] for b in range(batch)])
        out = []
        for i in range(6):
            if i == change_at:
                scale_weights(2.0)
            logits = decode(model, cache, slots, logits.argmax(-1).tolist(), step)
            out.append(logits)
        if change_at is not None:
            scale_weights(0.5)
        return torch.stack(out)

    for batch in (1, 3):
        torch.testing.assert_close(steps(batch, compiled), steps(batch, None), atol=1e-4, rtol=1e-4)
    assert compiled.compiled_steps == 5  # batch 1: the first step eager (new weights), then compiled; batch 3 eager
    torch.testing.assert_close(steps(1, compiled, change_at=3), steps(1, None, change_at=3), atol=1e-4, rtol=1e-4)
    greedy = SamplingParams(max_new_tokens=10)
    prompts = [[1, 2, 3]]
    assert generate(model, prompts, greedy, compiled)[0].tokens == generate(model, prompts, greedy)[0].tokens
