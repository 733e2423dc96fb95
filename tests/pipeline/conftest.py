"""Fixtures for the pipeline's tests: the real default teacher, and a real OpenAI-compatible server backed by it."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.teacher.hf import HFTeacher


@pytest.fixture(scope="session")
def teacher(teacher_dir):
    return HFTeacher(teacher_dir)


@pytest.fixture(scope="module")
def openai_server(teacher):
    """An OpenAI-compatible chat endpoint on loopback answering with the real default teacher.

    Yields (base_url, faults): set faults["fail"] = n (with "status") to fail the next n requests, or
    faults["stall"] = n (with "stall_s") to stall them, to check retries and flagging; "retry_after" adds that
    header to injected failures.
    """
    faults = {
        "fail": 0,
        "status": 500,
        "retry_after": None,
        "stall": 0,
        "stall_s": 0.0,
        "requests": 0,
        "auth": None,
        "arrivals": [],
    }
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, body, headers=None):
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                faults["requests"] += 1
                faults["arrivals"].append(time.monotonic())
                faults["auth"] = self.headers.get("Authorization")
                fail = faults["fail"] > 0
                faults["fail"] -= fail
                stall = faults["stall"] > 0
                faults["stall"] -= stall
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "not found"}})
            if fail:
                retry = {"Retry-After": str(faults["retry_after"])} if faults["retry_after"] else {}
                return self._send(faults["status"], {"error": {"message": "injected failure"}}, retry)
            if stall:
                time.sleep(faults["stall_s"])
            if not body.get("messages"):
                return self._send(400, {"error": {"message": "messages must not be empty"}})
            out = teacher.generate(
                [body["messages"]], max_new_tokens=body.get("max_tokens", 16), temperature=body.get("temperature", 0.0)
            )[0]
            self._send(
                200,
                {
                    "id": "x",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": out.text},
                            "finish_reason": out.finish_reason,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": out.prompt_tokens,
                        "completion_tokens": out.completion_tokens,
                        "total_tokens": out.prompt_tokens + out.completion_tokens,
                    },
                },
            )

    class Server(ThreadingHTTPServer):
        daemon_threads = False  # so server_close() waits for stalled requests instead of abandoning them

    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", faults
    httpd.shutdown()
    httpd.server_close()  # joins handler threads still finishing (stalled) requests
