"""The teacher role without Ray: chunked batches with per-chunk seeds, so a retried request reproduces itself;
scoring accepted samples in the teacher's context (its best prompt, or the student's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.teacher import GenerateRequest, ScoreRequest, TeacherWorker
from pipeline.config import TeacherConfig
from pipeline.data.prompts import chat_token_ids, teacher_messages
from pipeline.distill.targets import encode, loss_mask
from pipeline.teacher.hf import default_cache_dir

pytestmark = pytest.mark.slow


def test_sampled_requests_are_reproducible_by_seed_across_workers():
    cfg = TeacherConfig(temperature=1.0, top_p=0.95, batch_size=2, max_new_tokens=16)
    convs = [teacher_messages("basic_arithmetic", f"Calculate {a} + {b}.") for a, b in [(1, 2), (3, 4)]]
    convs += [[{"role": "user", "content": f"Tell me a story about a {pet}."}] for pet in ("cat", "dog", "fox", "owl")]
    first, second = TeacherWorker(cfg, default_cache_dir()), TeacherWorker(cfg, default_cache_dir(), num_threads=1)
    a = first.generate(GenerateRequest(convs, seed=11))
    b = second.generate(GenerateRequest(convs, seed=11))
    assert [g.text for g in a.generations] == [g.text for g in b.generations]
    assert len(a.generations) == 6 and a.completion_tokens == sum(g.completion_tokens for g in a.generations)
    assert a.teacher_id.startswith("hf:SmolLM2-135M-Instruct")
    others = [first.generate(GenerateRequest(convs, seed=s)) for s in (12, 13)]
    assert any([g.text for g in o.generations] != [g.text for g in a.generations] for o in others)


SAMPLES = [  # (task, question, an accepted completion in the taught format)
    ("basic_arithmetic", "Calculate 6 + 3.", "6 + 3 = 9. The final answer is 9."),
    ("chain_sum", "State the final answer to the following arithmetic problem: 5 + 1 + 2 =", "The final answer is 8."),
    ("letter_counting", 'How many times does the letter "e" appear in the text: "tree"?', "The final answer is 2."),
]


@pytest.fixture(scope="module")
def scorer():
    return TeacherWorker(TeacherConfig(), default_cache_dir())


def test_scoring_in_the_same_context_gives_the_targets_of_the_students_training_text_exactly(scorer):
    """`same` is distillation as it was before the teacher's context was a setting: the teacher scores the
    student's training text itself, in the same batches, to the bit."""
    got = scorer.score(ScoreRequest(SAMPLES, top_k=20, batch_size=2, context="same"))
    texts = [encode(scorer.teacher.tokenizer, q, c) for _, q, c in SAMPLES]
    assert got.sequences == texts and got.tokens == sum(len(s) for s, _ in texts)
    want = scorer.teacher.score([s for s, _ in texts[:2]], [i for _, i in texts[:2]], 20)
    want += scorer.teacher.score([texts[2][0]], [texts[2][1]], 20)
    for g, w in zip(got.targets, want, strict=True):
        np.testing.assert_array_equal(g.topk_ids, w.topk_ids)
        np.testing.assert_array_equal(g.topk_logprobs, w.topk_logprobs)
        np.testing.assert_array_equal(g.tail_logmass, w.tail_logmass)


def test_scoring_in_the_best_context_is_the_teachers_forward_pass_after_its_worked_examples_at_the_students_rows(
    scorer,
):
    """`best`: the same completion ids read after the teacher's worked examples; one row per completion token,
    so the rows sit at the student's loss-mask positions of its own (shorter) training text."""
    tokenizer = scorer.teacher.tokenizer
    best = scorer.score(ScoreRequest(SAMPLES, top_k=20, batch_size=3, context="best"))
    same = scorer.score(ScoreRequest(SAMPLES, top_k=20, batch_size=3, context="same"))
    assert best.sequences == same.sequences  # the student's text and positions do not change
    assert best.tokens > same.tokens  # the teacher read its worked examples too
    for (task, question, _), (ids, start), got, bare in zip(
        SAMPLES, best.sequences, best.targets, same.targets, strict=True
    ):
        context = chat_token_ids(tokenizer, teacher_messages(task, question))
        full = context + ids[start:]
        with torch.no_grad():
            logits = scorer.teacher.model(torch.tensor([full])).logits[0].float()
        lp = torch.log_softmax(logits[len(context) - 1 : len(full) - 1], -1)
        want_lp, want_ids = lp.topk(20, -1)
        assert got.topk_ids.shape == (sum(loss_mask(len(ids), start)), 20) == (len(ids) - start, 20)
        np.testing.assert_array_equal(got.topk_ids, want_ids.numpy())
        np.testing.assert_allclose(got.topk_logprobs, want_lp.numpy(), atol=1e-4)
        own = lp.gather(-1, torch.tensor(ids[start:])[:, None])[:, 0]
        np.testing.assert_allclose(got.token_logprobs, own.numpy(), atol=1e-4)
        assert not np.array_equal(got.topk_logprobs, bare.topk_logprobs)  # the context changed what it predicts
