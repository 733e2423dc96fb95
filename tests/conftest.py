"""Shared fixtures: a real local Ray cluster and a real MLflow tracking server on loopback, both started by the
tests themselves and stopped after; nothing here is mocked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Ray workers inherit the driver's environment: make test-only stages (tests/...) importable there.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)
# Dequantized teachers are cached per checkout, shared by the test process and its Ray workers, kept between runs.
os.environ.setdefault("MOEFORGE_CACHE_DIR", str(REPO / ".moeforge" / "test-cache"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session (starting one costs ~7 s here)."""
    import ray

    # with the dashboard: Ray Train V2 and the state API query actors through it
    ray.init(num_cpus=2, include_dashboard=True, namespace="moeforge-tests", log_to_driver=True)
    yield
    ray.shutdown()


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    artifacts: Path  # the folder behind --artifacts-destination, for tests that damage stored files


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with a SQLite store and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", (root / "artifacts").as_uri(), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout=120, proc=proc)
        yield MlflowServer(uri, root / "artifacts")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
