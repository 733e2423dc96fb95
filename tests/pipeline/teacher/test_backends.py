"""The backend factory: each backend is chosen by config, and an unavailable one fails clearly."""

from __future__ import annotations

import importlib.util

import pytest

from pipeline.config import TeacherConfig
from pipeline.teacher import load_teacher


def test_openai_backend_is_built_from_config():
    teacher = load_teacher(
        TeacherConfig(
            backend="openai",
            base_url="http://127.0.0.1:9/v1",
            model="m",
            request_timeout=5,
            max_retries=1,
            batch_size=3,
        ),
        "unused",
    )
    assert teacher.teacher_id == "openai:m@http://127.0.0.1:9/v1"
    assert (teacher.max_retries, teacher.concurrency, teacher.timeout) == (1, 3, 5)
    assert (teacher.client.max_retries, teacher.client.timeout) == (1, 5)  # the SDK retries and times out


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_says_how_to_get_it(tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'moeforge\[vllm\]'"):
        load_teacher(TeacherConfig(backend="vllm"), tmp_path)
