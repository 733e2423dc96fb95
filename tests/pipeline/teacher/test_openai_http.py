"""The `openai` backend over real HTTP, against an OpenAI-compatible server on loopback that the test starts.

The server answers with the real default teacher; it can be told to fail or stall the next requests, to check
that retries recover and that what cannot be recovered comes back flagged, never dropped.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.teacher.openai_http import OpenAITeacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(teacher):
    faults = {"fail": 0, "status": 500, "stall": 0, "stall_s": 0.0, "requests": 0, "auth": None}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                faults["requests"] += 1
                faults["auth"] = self.headers.get("Authorization")
                fail = faults["fail"] > 0
                faults["fail"] -= fail
                stall = faults["stall"] > 0
                faults["stall"] -= stall
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "not found"}})
            if fail:
                return self._send(faults["status"], {"error": {"message": "injected failure"}})
            if stall:
                time.sleep(faults["stall_s"])
            if not body.get("messages"):
                return self._send(400, {"error": {"message": "messages must not be empty"}})
            out = teacher.generate([body["messages"]], max_new_tokens=body.get("max_tokens", 16),
                                   temperature=body.get("temperature", 0.0))[0]
            self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                          "finish_reason": out.finish_reason}],
                             "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                                       "total_tokens": out.prompt_tokens + out.completion_tokens}})

    class Server(ThreadingHTTPServer):
        daemon_threads = False  # so server_close() waits for stalled requests instead of abandoning them

    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", faults
    httpd.shutdown()
    httpd.server_close()  # joins handler threads still finishing (stalled) requests


QUESTION = [{"role": "user", "content": "What is 3 + 4? Answer with a number."}]


def test_answers_in_order_with_usage_and_the_api_key(server, monkeypatch):
    url, faults = server
    monkeypatch.setenv("MY_KEY", "sekret")
    client = OpenAITeacher(url, "smollm2", api_key_env="MY_KEY", concurrency=2)
    convs = [QUESTION, [{"role": "user", "content": "Say hello."}], QUESTION]
    out = client.generate(convs, max_new_tokens=16)
    assert [o.error for o in out] == [None, None, None]
    assert "7" in out[0].text and out[0].text == out[2].text and out[0].completion_tokens > 0
    assert faults["auth"] == "Bearer sekret"


def test_transient_500s_are_retried(server):
    url, faults = server
    faults.update(fail=2, status=503)
    out = OpenAITeacher(url, "smollm2", max_retries=3, backoff=0.01).generate([QUESTION], max_new_tokens=8)
    assert out[0].error is None and out[0].text


def test_persistent_failures_and_timeouts_come_back_flagged(server):
    url, faults = server
    faults.update(fail=10, status=500)
    client = OpenAITeacher(url, "smollm2", max_retries=2, backoff=0.01, concurrency=1)
    out = client.generate([QUESTION, QUESTION], max_new_tokens=8)
    assert [o.finish_reason for o in out] == ["error", "error"]
    assert all("HTTP 500" in o.error and "after 3 attempts" in o.error for o in out)
    faults.update(fail=0, stall=10, stall_s=1.5)
    slow = OpenAITeacher(url, "smollm2", timeout=0.5, max_retries=1, backoff=0.01, concurrency=1)
    out = slow.generate([QUESTION], max_new_tokens=8)
    assert out[0].finish_reason == "error" and "timed out" in out[0].error
    faults.update(stall=0)


def test_client_errors_are_not_retried(server):
    url, faults = server
    before = faults["requests"]
    out = OpenAITeacher(url, "smollm2", max_retries=3, backoff=0.01).generate([[]], max_new_tokens=8)
    assert out[0].finish_reason == "error" and "HTTP 400" in out[0].error
    assert faults["requests"] == before + 1
