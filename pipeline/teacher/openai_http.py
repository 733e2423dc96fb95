"""The `openai` teacher backend: any OpenAI-compatible chat-completions endpoint over HTTP.

A vLLM server, a hosted model, or this project's own serving endpoint. Requests run concurrently up to a bound;
timeouts, connection errors, 429 and 5xx are retried with exponential backoff; a request that still fails becomes
a `Generation` flagged with its error, so the caller records it as a failed sample instead of losing it.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from pipeline.teacher.base import Generation

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


class OpenAITeacher:
    """Chat completions from an OpenAI-compatible server.

    Args:
        base_url: e.g. `http://127.0.0.1:8000/v1`.
        model: the served model name.
        api_key_env: environment variable holding the API key (sent as a Bearer token when set).
        timeout: seconds per request.
        max_retries: retries after the first attempt, for retryable failures only.
        backoff: first retry delay in seconds; doubles each retry, with jitter.
        concurrency: requests in flight at once.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 0.5, concurrency: int = 8):
        headers = {}
        if key := os.environ.get(api_key_env):
            headers["Authorization"] = f"Bearer {key}"
        self.teacher_id = f"openai:{model}@{base_url.rstrip('/')}"
        self.model, self.max_retries, self.backoff, self.concurrency = model, max_retries, backoff, concurrency
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                   limits=httpx.Limits(max_connections=concurrency))

    def close(self) -> None:
        self.client.close()

    def _one(self, messages: list[dict[str, str]], body: dict) -> Generation:
        t0 = time.perf_counter()
        error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + random.random() / 4))
            try:
                resp = self.client.post("/chat/completions", json={**body, "messages": messages})
            except httpx.TimeoutException:
                error = f"timed out after {self.client.timeout.read}s"
                continue
            except httpx.TransportError as e:
                error = f"connection error: {e}"
                continue
            if resp.status_code in RETRYABLE:
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code != 200:  # a client error will not get better by retrying
                return Generation("", 0, 0, "error", time.perf_counter() - t0,
                                  error=f"HTTP {resp.status_code}: {resp.text[:200]}")
            try:
                data = resp.json()
                choice = data["choices"][0]
                usage = data.get("usage") or {}
                return Generation(choice["message"]["content"] or "", int(usage.get("prompt_tokens", 0)),
                                  int(usage.get("completion_tokens", 0)), choice.get("finish_reason") or "stop",
                                  time.perf_counter() - t0)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                return Generation("", 0, 0, "error", time.perf_counter() - t0,
                                  error=f"malformed response ({type(e).__name__}: {e})")
        return Generation("", 0, 0, "error", time.perf_counter() - t0,
                          error=f"{error} (after {self.max_retries + 1} attempts)")

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]:
        """One completion per conversation, in order; failures come back flagged (`finish_reason == "error"`)."""
        body = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            body["seed"] = seed
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda m: self._one(m, body), conversations))
