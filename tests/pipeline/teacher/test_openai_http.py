"""The `openai` backend over real HTTP, against an OpenAI-compatible server on loopback that the test starts
(`openai_server` in tests/pipeline/conftest.py: the real default teacher behind it, failures injectable)."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.teacher.openai_http import OpenAITeacher

pytestmark = pytest.mark.slow


QUESTION = [{"role": "user", "content": "What is 3 + 4? Answer with a number."}]


def test_answers_in_order_with_usage_and_the_api_key(openai_server, monkeypatch):
    url, faults = openai_server
    monkeypatch.setenv("MY_KEY", "sekret")
    client = OpenAITeacher(url, "smollm2", api_key_env="MY_KEY", concurrency=2)
    convs = [QUESTION, [{"role": "user", "content": "Say hello."}], QUESTION]
    out = client.generate(convs, max_new_tokens=16)
    assert [o.error for o in out] == [None, None, None]
    assert "7" in out[0].text and out[0].text == out[2].text and out[0].completion_tokens > 0
    assert faults["auth"] == "Bearer sekret"


def test_the_api_key_can_come_from_a_file_and_a_missing_one_is_named(openai_server, tmp_path, monkeypatch):
    url, faults = openai_server
    monkeypatch.setenv("MY_KEY", "from-the-environment")
    (tmp_path / "key").write_text("from-the-file\n")
    client = OpenAITeacher(url, "smollm2", api_key_env="MY_KEY", api_key_file=str(tmp_path / "key"))
    assert client.generate([QUESTION], max_new_tokens=2)[0].error is None
    assert faults["auth"] == "Bearer from-the-file" and "from-the-file" not in client.teacher_id
    with pytest.raises(ConfigError, match=r"teacher\.api_key_file .*/nope does not exist"):
        OpenAITeacher(url, "smollm2", api_key_file=str(tmp_path / "nope"))


def test_transient_500s_are_retried(openai_server):
    url, faults = openai_server
    faults.update(fail=2, status=503)
    out = OpenAITeacher(url, "smollm2", max_retries=3).generate([QUESTION], max_new_tokens=8)
    assert out[0].error is None and out[0].text


def test_persistent_failures_and_timeouts_come_back_flagged(openai_server):
    url, faults = openai_server
    faults.update(fail=10, status=500)
    client = OpenAITeacher(url, "smollm2", max_retries=2, concurrency=1)
    out = client.generate([QUESTION, QUESTION], max_new_tokens=8)
    assert [o.finish_reason for o in out] == ["error", "error"]
    assert all("HTTP 500" in o.error and "after 3 attempts" in o.error for o in out)
    faults.update(fail=0, stall=10, stall_s=1.5)
    slow = OpenAITeacher(url, "smollm2", timeout=0.5, max_retries=1, concurrency=1)
    out = slow.generate([QUESTION], max_new_tokens=8)
    assert out[0].finish_reason == "error" and "timed out" in out[0].error
    faults.update(stall=0)


def test_a_429_is_retried_after_the_servers_retry_after(openai_server):
    url, faults = openai_server
    faults.update(fail=1, status=429, retry_after=1.0)
    try:
        out = OpenAITeacher(url, "smollm2", max_retries=1).generate([QUESTION], max_new_tokens=8)
    finally:
        faults.update(retry_after=None)
    assert out[0].error is None and out[0].text
    first, retry = faults["arrivals"][-2:]
    assert retry - first >= 1.0  # exponential backoff alone would have retried after at most 0.5 s


def test_client_errors_are_not_retried(openai_server):
    url, faults = openai_server
    before = faults["requests"]
    out = OpenAITeacher(url, "smollm2", max_retries=3).generate([[]], max_new_tokens=8)
    assert out[0].finish_reason == "error" and "HTTP 400" in out[0].error
    assert faults["requests"] == before + 1
