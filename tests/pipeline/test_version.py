"""The code version is a hash of the code itself: the same without git, changed by any edit to the code packages."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.version import CODE_DIRS, code_version, has_code, version_of

REPO = Path(__file__).resolve().parents[2]


def copy_code(dest: Path) -> Path:
    for package in CODE_DIRS:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_the_version_is_the_codes_own_with_or_without_git(tmp_path):
    copy = copy_code(tmp_path / "work")  # what a Ray job gets: the sources, no .git
    assert has_code(copy) and not (copy / ".git").exists()
    assert version_of(copy) == code_version()
    (copy / "pipeline" / "stages" / "train.py").write_text(
        (copy / "pipeline" / "stages" / "train.py").read_text() + "\n# an edit\n"
    )
    edited = version_of(copy)
    assert edited != code_version() and edited.startswith(code_version().split("+")[0] + "+src.")
    (copy / "README.md").write_text("docs are not code")
    (copy / "pipeline" / "__pycache__").mkdir(exist_ok=True)
    (copy / "pipeline" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"compiled")
    assert version_of(copy) == edited  # only the Python sources of the code packages count
