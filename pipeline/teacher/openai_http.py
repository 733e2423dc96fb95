"""The `openai` teacher backend: any OpenAI-compatible chat-completions endpoint, through the official `openai` SDK.

A vLLM server, a hosted model, or this project's own serving endpoint. Requests run concurrently up to a bound.
The SDK retries timeouts, connection errors, 408, 409, 429 and 5xx with exponential backoff and honours the
server's Retry-After; a request that still fails becomes a `Generation` flagged with its error, so the caller
records it as a failed sample instead of losing it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from pipeline.data.generation import Generation


def _retried(status: int) -> bool:
    """Whether the SDK retries a response with this status (a client error will not get better by retrying)."""
    return status in (408, 409, 429) or status >= 500


class OpenAITeacher:
    """Chat completions from an OpenAI-compatible server.

    Args:
        base_url: e.g. `http://127.0.0.1:8000/v1`.
        model: the served model name.
        api_key_env: environment variable holding the API key (sent as a Bearer token; servers without auth get
            the placeholder "EMPTY", as vLLM's docs use).
        timeout: seconds per request.
        max_retries: retries after the first attempt, for retryable failures only.
        concurrency: requests in flight at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 8,
    ):
        self.teacher_id = f"openai:{model}@{base_url.rstrip('/')}"
        self.model, self.max_retries, self.timeout, self.concurrency = model, max_retries, timeout, concurrency
        self.client = openai.OpenAI(
            base_url=base_url.rstrip("/"),
            api_key=os.environ.get(api_key_env) or "EMPTY",
            timeout=timeout,
            max_retries=max_retries,
        )

    def close(self) -> None:
        self.client.close()

    def _one(self, messages: list[dict[str, str]], body: dict) -> Generation:
        t0 = time.perf_counter()
        attempts = f"(after {self.max_retries + 1} attempts)"

        def failed(error: str) -> Generation:
            return Generation("", 0, 0, "error", time.perf_counter() - t0, error=error)

        try:
            resp = self.client.chat.completions.create(messages=messages, **body)
        except openai.APITimeoutError:
            return failed(f"timed out after {self.timeout}s {attempts}")
        except openai.APIConnectionError as e:
            return failed(f"connection error: {e} {attempts}")
        except openai.APIStatusError as e:
            error = f"HTTP {e.status_code}: {str(e.message)[:200]}"
            return failed(f"{error} {attempts}" if _retried(e.status_code) else error)
        try:
            choice = resp.choices[0]
            usage = resp.usage
            return Generation(
                choice.message.content or "",
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
                choice.finish_reason or "stop",
                time.perf_counter() - t0,
            )
        except (AttributeError, IndexError, TypeError) as e:
            return failed(f"malformed response ({type(e).__name__}: {e})")

    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """One completion per conversation, in order; failures come back flagged (`finish_reason == "error"`)."""
        body = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            body["seed"] = seed
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda m: self._one(m, body), conversations))
