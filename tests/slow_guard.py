"""The test tiers hold: a pytest plugin (loaded by tests/conftest.py) that fails a test that starts Ray, a server, a
compile or a Python subprocess without being marked `slow` (or `cluster`).

`make test-fast` deselects those marks. Without this check one unmarked test that starts a Ray cluster or
compiles a decode step silently adds minutes to the inner loop. What counts as "starting" is observed, not guessed:
`ray.init`, `torch.compile`, a uvicorn server's `serve`, and a `subprocess.Popen` of a Python interpreter or of
one of the virtual environment's entry points (moeforge, mlflow, ray, ...) or of the browser, each recorded while
the test runs; a fixture that starts one of those for the whole session is named in SLOW_FIXTURES.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SLOW_MARKS = ("slow", "cluster")
# session fixtures that start a Ray cluster or a server once (tests/conftest.py): a test that asks for one is slow
# even when another test already paid for the start
SLOW_FIXTURES = frozenset({"ray_cluster", "mlflow_server", "llama_cpp_server", "upstream"})
VENV_BIN = Path(sys.executable).parent
BROWSER = frozenset({"chromium", "chromedriver", "chrome"})


def starts_a_driver(args) -> bool:
    """Whether a `Popen` of `args` starts a Python process: the interpreter, one of the venv's entry points, or the
    browser (a process tree of its own)."""
    argv = [args] if isinstance(args, str | os.PathLike) else list(args)
    if not argv:
        return False
    exe = Path(str(argv[0]).split()[0])
    return exe.name.startswith("python") or exe.parent == VENV_BIN or exe.name in BROWSER


def _recorded(seen: list[str], what: str, real):
    def call(*args, **kwargs):
        seen.append(what)
        return real(*args, **kwargs)

    return call


@pytest.fixture(autouse=True)
def _slow_work_is_marked(request, monkeypatch):
    if any(request.node.get_closest_marker(m) for m in SLOW_MARKS):
        yield
        return
    used = sorted(SLOW_FIXTURES & set(request.fixturenames))
    if used:
        pytest.fail(f"{request.node.nodeid} uses {used} but is not marked slow: add @pytest.mark.slow", pytrace=False)
    seen: list[str] = []
    import torch

    monkeypatch.setattr(torch, "compile", _recorded(seen, "torch.compile", torch.compile))
    try:
        import ray
    except ImportError:
        pass
    else:
        monkeypatch.setattr(ray, "init", _recorded(seen, "ray.init", ray.init))
    try:
        import uvicorn
    except ImportError:
        pass
    else:
        monkeypatch.setattr(uvicorn.Server, "serve", _recorded(seen, "a uvicorn server", uvicorn.Server.serve))
    popen_init = subprocess.Popen.__init__

    def popen(self, args, *rest, **kwargs):
        if starts_a_driver(args):
            shown = args if isinstance(args, str) else " ".join(map(str, args))
            seen.append(f"the subprocess {shown[:80]!r}")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    yield
    if seen:
        pytest.fail(
            f"{request.node.nodeid} is not marked slow but started {', '.join(sorted(set(seen)))}: "
            "add @pytest.mark.slow (`make test-fast` deselects it)",
            pytrace=False,
        )
