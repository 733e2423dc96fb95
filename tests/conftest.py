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
# tests/slow_guard.py: a test that starts Ray, a server, a compile or a Python subprocess unmarked fails;
# pytester: tests of that check run pytest on a small test file of their own
pytest_plugins = ["tests.slow_guard", "pytester"]

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
    log = open(root / "server.log", "w")  # noqa: SIM115 - the server's output for the session; closed at teardown
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            (root / "artifacts").as_uri(),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
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


@pytest.fixture(scope="session")
def teacher_dir():
    """The default teacher, dequantized once into the test cache ($MOEFORGE_CACHE_DIR, set above)."""
    from pipeline.teacher.hf import DEFAULT_TEACHER, default_cache_dir, resolve_model_dir

    return resolve_model_dir(DEFAULT_TEACHER, default_cache_dir())


@dataclass(frozen=True)
class RegisteredStudent:
    directory: Path  # the saved student (weights, config, tokenizer)
    tracking_uri: str  # a SQLite MLflow store holding it as version 1 of `name`, alias champion
    name: str


@pytest.fixture(scope="session")
def llama_cpp_server():
    """llama-cpp-python's OpenAI-compatible server (a real third-party server) on the default teacher's shipped
    GGUF, on loopback for the session: a `benchmarks.peers.LlamaCppServer` (`.base_url`, `.MODEL`, `kill()`,
    `start()`). It is built by `make peers`, which `make test` runs; without it the test fails saying so."""
    from benchmarks.peers import LlamaCppServer, peers_python

    python = peers_python()
    if python is None:
        pytest.fail("llama-cpp-python is not built: run `make peers` (`make test` does)")
    server = LlamaCppServer(python, threads=2).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registered_student(tmp_path_factory, teacher_dir) -> RegisteredStudent:
    """A small randomly initialised student with the teacher's tokenizer, saved and registered as
    `test-student` version 1 @champion (serving tests need a real registry entry, not a trained model)."""
    import torch
    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    from pipeline.config import ModelConfig
    from pipeline.model import Transformer
    from pipeline.student.registry import log_student

    root = tmp_path_factory.mktemp("student")
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    torch.manual_seed(0)
    model = Transformer.for_tokenizer(
        ModelConfig(
            init="scratch",
            dim=64,
            n_layers=2,
            n_heads=2,
            inter_dim=128,
            moe_inter_dim=32,
            n_routed_experts=8,
            n_shared_experts=1,
            n_activated_experts=2,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            max_seq_len=256,
        ),
        tokenizer,
    )
    model.save_pretrained(root / "student", tokenizer)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("serve", artifact_location=str(root / "artifacts")))
    version = log_student(root / "student", run.info.run_id, uri, "test-student")
    client.set_registered_model_alias("test-student", "champion", version.version)
    return RegisteredStudent(root / "student", uri, "test-student")


def headless_chromium():
    """A WebDriver on Debian's headless Chromium (tests/install_browser.sh installs it); the caller quits it."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_bin, "Debian's chromium and chromium-driver are missing: run tests/install_browser.sh"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_bin), options=options)
