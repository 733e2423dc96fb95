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


BACKENDS = {"hf", "openai", "vllm"}


def _branches_on_a_backend(source: str) -> list[str]:
    """Comparisons in `source` that test a backend: `x.backend == ...`, `... in ("hf", ...)`, `"vllm" != y`."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = {n.attr for o in operands for n in ast.walk(o) if isinstance(n, ast.Attribute)}
            names |= {n.id for o in operands for n in ast.walk(o) if isinstance(n, ast.Name)}
            constants = {n.value for o in operands for n in ast.walk(o) if isinstance(n, ast.Constant)}
            if "backend" in names or constants & BACKENDS:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Call) and any(
            isinstance(k.value, ast.Dict)
            and any(isinstance(c, ast.Constant) and c.value == "backend" for c in k.value.keys)
            for k in node.keywords
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")  # model_copy(update={"backend": ...})
    return found


def test_no_stage_or_actor_branches_on_a_backend_name():
    """Stages and actors ask a teacher for capabilities (and the config for local weights), never for a backend:
    a new backend then needs no change outside pipeline/teacher/."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    modules = sorted([*(root / "pipeline" / "stages").glob("*.py"), *(root / "actors").glob("*.py")])
    assert len(modules) > 10
    found = {str(m.relative_to(root)): b for m in modules if (b := _branches_on_a_backend(m.read_text()))}
    assert found == {}


def test_the_backend_check_finds_what_it_looks_for():
    assert _branches_on_a_backend('if cfg.teacher.backend == "openai":\n    pass')
    assert _branches_on_a_backend('t = t.model_copy(update={"backend": "hf"})')
    assert _branches_on_a_backend('ok = "vllm" != name')
    assert not _branches_on_a_backend("if caps.score:\n    pass")
