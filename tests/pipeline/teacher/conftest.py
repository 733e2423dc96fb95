from __future__ import annotations

import pytest

from pipeline.teacher.hf import DEFAULT_TEACHER, HFTeacher, resolve_model_dir


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """The default teacher, dequantized once for the whole session (~40 s)."""
    return resolve_model_dir(DEFAULT_TEACHER, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def teacher(teacher_dir):
    return HFTeacher(teacher_dir)
