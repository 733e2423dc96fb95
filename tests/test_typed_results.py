"""The stage contract's promise (pipeline/stages/results.py): a stage result stored as JSON beside a checkpoint or a
report is written and read only through its type. Outside results.py no code names a result's file, so none can
open it and parse (or write) it as a bare dict."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pipeline", "actors", "jobs", "benchmarks")
RESULTS = ROOT / "pipeline" / "stages" / "results.py"


def result_files() -> dict[str, str]:
    """constant name -> file name, every `*_FILE` of results.py"""
    out = {}
    for node in ast.parse(RESULTS.read_text()).body:
        if isinstance(node, ast.Assign):
            targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for t, v in zip(targets, values, strict=True):
                if isinstance(t, ast.Name) and t.id.endswith("_FILE") and isinstance(v, ast.Constant):
                    out[t.id] = v.value
    return out


def bare_accesses(source: str, files: dict[str, str]) -> list[str]:
    """Where `source` names a result's file: a string that is the file name (or a path ending in it), or one of
    results.py's `*_FILE` constants imported. Docstrings and descriptions that mention a file in prose do not count."""
    names = set(files.values())
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in names or any(node.value.endswith("/" + n) for n in names):
                found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.ImportFrom) and node.module == "pipeline.stages.results":
            found += [f"line {node.lineno}: imports {a.name}" for a in node.names if a.name in files]
    return found


def test_results_py_names_every_result_file():
    files = result_files()
    assert set(files.values()) == {
        "conversion.json",
        "refine.json",
        "summary.json",
        "registration.json",
        "exports.json",
        "endpoint.json",
    }, files


def test_no_code_outside_results_py_reads_or_writes_a_result_file_by_name():
    files = result_files()
    offenders = {}
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != RESULTS and (found := bare_accesses(path.read_text(), files)):
                offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, f"read or write these through their types (pipeline/stages/results.py): {offenders}"


def test_the_check_finds_a_bare_dict_read_and_write():
    files = result_files()
    read = 'import json\nsummary = json.loads((path / "summary.json").read_text())\n'
    write = 'import json\n(out / "registration.json").write_text(json.dumps({"alias": "champion"}))\n'
    through_constant = "from pipeline.stages.results import ENDPOINT_FILE\n"
    prose = '"""The stage writes endpoint.json beside its output."""\n'
    assert bare_accesses(read, files) == ["line 2: 'summary.json'"]
    assert bare_accesses(write, files) == ["line 2: 'registration.json'"]
    assert bare_accesses(through_constant, files) == ["line 1: imports ENDPOINT_FILE"]
    assert bare_accesses(prose, files) == []
