"""The code version that stage cache keys and run tags carry."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The folders whose code runs in stages; edits elsewhere (tests, docs) do not invalidate the cache.
CODE_DIRS = ("pipeline", "actors", "jobs")


def package_version() -> str:
    try:
        return version("moeforge")
    except PackageNotFoundError:
        return "0+unknown"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                          timeout=10).stdout


@functools.cache
def code_version() -> str:
    """`$MOEFORGE_CODE_VERSION`, else `<version>+g<sha>[.dirty<diff hash>]` from git, else the package version.

    Uncommitted edits to the code folders change the version (through a hash of the diff), so a stage's cache
    never outlives the code that produced it.
    """
    if env := os.environ.get("MOEFORGE_CODE_VERSION"):
        return env
    root = Path(__file__).resolve().parent.parent
    try:
        sha = _git(root, "rev-parse", "HEAD").strip()
        diff = _git(root, "diff", "HEAD", "--", *CODE_DIRS)
        untracked = _git(root, "ls-files", "--others", "--exclude-standard", "--", *CODE_DIRS)
    except (OSError, subprocess.SubprocessError):
        return package_version()
    tag = f"{package_version()}+g{sha[:12]}"
    if diff or untracked:
        h = hashlib.sha256(diff.encode())
        for rel in sorted(untracked.split()):
            h.update(rel.encode())
            h.update((root / rel).read_bytes() if (root / rel).is_file() else b"")
        tag += f".dirty{h.hexdigest()[:8]}"
    return tag
