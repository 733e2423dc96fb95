"""Every package's docstring is its table of contents: it names each of its modules (`name.py`) and subpackages
(`name/`), and names nothing that is not there. A module added without a line, or removed with its line left,
fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.parent for top in ("pipeline", "actors", "jobs") for p in (ROOT / top).rglob("__init__.py"))


def contents(package: Path) -> set[str]:
    modules = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    return modules | {f"{p.parent.name}/" for p in package.glob("*/__init__.py")}


def named(package: Path) -> set[str]:
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    # `name.py` or `name/`, not inside a longer path (pipeline/model/__init__.py names other packages' files)
    return set(re.findall(r"(?<![\w/.])(\w+\.py|\w+/)(?![\w/])", doc))


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_package_docstring_names_exactly_its_modules(package: Path):
    there, listed = contents(package), named(package)
    assert not there - listed, f"{package.relative_to(ROOT)}/__init__.py does not name {sorted(there - listed)}"
    assert not listed - there, f"{package.relative_to(ROOT)}/__init__.py names missing {sorted(listed - there)}"
