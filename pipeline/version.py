"""The code version that stage cache keys and run tags carry: a hash of the code itself.

It is computed from the source files of the packages that run stages, wherever they are: a git checkout, a Ray
job's uploaded working dir (which has no `.git`), a container image, an installed wheel. So a stage's cache never
outlives the code that produced it, with or without git. `moeforge submit` computes it from the working dir it
uploads and sets `MOEFORGE_CODE_VERSION` in the job; images record it at build time (`python -m pipeline.version`).
Either is checked against the code the process really runs, which wins on a mismatch (a stale image variable, a
working dir shadowed by an installed copy) with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

log = logging.getLogger(__name__)

# The packages whose code runs in stages; edits elsewhere (tests, docs) do not invalidate the cache.
CODE_DIRS = ("pipeline", "actors", "jobs")
ENV = "MOEFORGE_CODE_VERSION"


def package_version() -> str:
    try:
        return version("moeforge")
    except PackageNotFoundError:
        return "0+unknown"


def source_hash(root: Path) -> str:
    """sha256 over the path and bytes of every Python source under `root`'s code packages (sorted, so stable)."""
    h = hashlib.sha256()
    for package in CODE_DIRS:
        for path in sorted((Path(root) / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(root).as_posix()
            h.update(f"{rel}\0{path.stat().st_size}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def version_of(root: Path) -> str:
    """`<package version>+src.<first 12 hex of the source hash>` of the code under `root`."""
    return f"{package_version()}+src.{source_hash(root)[:12]}"


def has_code(root: Path) -> bool:
    return all((Path(root) / package / "__init__.py").is_file() for package in CODE_DIRS)


@functools.cache
def code_version() -> str:
    """The version of the code this process runs (the folder these packages were imported from)."""
    running = version_of(Path(__file__).resolve().parent.parent)
    carried = os.environ.get(ENV)
    if carried and carried != running:
        log.warning(
            "%s is %s but the code this process runs is %s: using the code's own version (a stale image "
            "variable, or a submitted working dir shadowed by another copy of the code)",
            ENV,
            carried,
            running,
        )
    return running


if __name__ == "__main__":  # image builds record the version: `python -m pipeline.version`
    print(code_version())
