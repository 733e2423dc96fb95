"""The import structure the layout promises: no import cycle anywhere in the packages (lazy, function-level
imports included), the model package independent of the application's config, and cheap imports cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "actors", "jobs")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source (top level or inside functions)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {r for t in targets if (r := resolve(t)) and r != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle_in_the_packages():
    graph = import_graph()
    assert len(graph) > 50 and graph["pipeline.config"], "the walk found the packages' modules and their imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.slow  # a fresh interpreter per case
@pytest.mark.parametrize(
    ("imports", "absent"),
    [
        # the model owns its config: nothing of the application's config, Ray or the pipeline's stages
        (
            "pipeline.model, pipeline.model.config, pipeline.model.transformer, pipeline.model.generate, "
            "pipeline.model.hf_compat",
            ("pipeline.config", "ray", "pipeline.stage", "mlflow"),
        ),
        # the config loader (what `moeforge config show` needs) does not pay for torch
        ("pipeline.config", ("torch", "ray", "mlflow")),
    ],
)
def test_imports_pull_in_only_what_they_need(imports, absent):
    code = f"import sys; import {imports}; print(','.join(m for m in {absent!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"import {imports} pulled in {proc.stdout.strip()}"


def test_the_model_package_never_names_the_application_config():
    graph = import_graph()
    for name in (m for m in graph if m.startswith("pipeline.model")):
        assert not {"pipeline.config", "pipeline.stage", "pipeline.runner"} & graph[name], name


def test_the_data_package_never_imports_the_teacher_package():
    """The teacher backends build on pipeline.data (prompts, chat templates, completion records), never the other
    way round: a completion record is data, whoever wrote it."""
    graph = import_graph()
    data = [m for m in graph if m == "pipeline.data" or m.startswith("pipeline.data.")]
    assert len(data) > 3, data
    upward = {m: sorted(t for t in graph[m] if t.startswith("pipeline.teacher")) for m in data}
    assert not any(upward.values()), upward


def test_no_stage_imports_another_stage():
    """Stages meet only through the artifacts of artifact_specs.py and the runner; a stage importing another would
    couple their code, not just their data."""
    from pipeline.runner import default_stages

    stages = {type(s).__module__ for s in default_stages()}
    assert {"pipeline.stages.generate", "pipeline.stages.evaluate"} <= stages, stages
    graph = import_graph()
    coupled = {m: sorted(graph[m] & (stages - {m})) for m in stages}
    assert not any(coupled.values()), coupled
