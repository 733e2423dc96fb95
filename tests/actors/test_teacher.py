"""The teacher role without Ray: chunked batches with per-chunk seeds, so a retried request reproduces itself."""

from __future__ import annotations

import pytest

from actors.teacher import GenerateRequest, TeacherWorker
from pipeline.config import TeacherConfig
from pipeline.data.prompts import teacher_messages
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
