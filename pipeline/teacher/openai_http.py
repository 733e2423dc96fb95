"""The `openai` teacher backend: any OpenAI-compatible endpoint, through the official `openai` SDK.

A vLLM or llama.cpp server, a hosted model, or this project's own serving endpoint. Requests run concurrently up
to a bound. The SDK retries timeouts, connection errors, 408, 409, 429 and 5xx with exponential backoff and
honours the server's Retry-After; a generation that still fails becomes a `Generation` flagged with its error, so
the caller records it as a failed sample instead of losing it. Scoring raises instead (`TeacherUnreachable`): its
caller redoes the whole partition.

With a local tokenizer (`vocabulary`), the teacher also gives logits where the server does, detected once per
server by `capabilities()`:
- scoring given text: legacy completions with `echo` and `logprobs` return the top-k of every prompt token (vLLM,
  llama.cpp's Python server); the server's tokens are checked against the local tokenizer's on a probe text first,
  and a server that tokenises differently is refused, with the first difference as the reason;
- top-k log-probs of generated tokens: chat completions with `logprobs` and `top_logprobs` (vLLM, llama.cpp,
  hosted APIs up to 20).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai

from pipeline.config import read_api_key
from pipeline.data.generation import Generation, TokenLogprob
from pipeline.teacher.base import SoftTargets, TeacherCapabilities
from pipeline.teacher.remote_logprobs import EchoedLogprobs, Misaligned, TokenPieces, align, soft_targets

PROBE = [
    {"role": "user", "content": "Probe: what is 12 + 7? Spell naïve, café and 三."},
    {"role": "assistant", "content": "12 + 7 = 19. naïve, café, 三 <answer>19</answer>"},
]  # digits, punctuation, accents and a multi-byte character: where tokenisers part ways


class TeacherUnreachable(RuntimeError):
    """The server did not answer a scoring request after the retries; the message says how it failed."""


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
        api_key_file: a file holding the key instead (a mounted secret).
        timeout: seconds per request.
        max_retries: retries after the first attempt, for retryable failures only.
        concurrency: requests in flight at once.
        vocabulary: a local tokenizer directory whose ids the soft targets use (the student's); without one the
            teacher only generates text.
        top_k: log-probs asked for per position when probing and generating with log-probs.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        api_key_file: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 8,
        vocabulary: str | None = None,
        top_k: int = 20,
    ):
        self.teacher_id = f"openai:{model}@{base_url.rstrip('/')}"
        self.model, self.max_retries, self.timeout, self.concurrency = model, max_retries, timeout, concurrency
        self.top_k = top_k
        self.tokenizer = None
        self._pieces: TokenPieces | None = None
        self._capabilities: TeacherCapabilities | None = None
        if vocabulary is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(vocabulary)
            self._pieces = TokenPieces(self.tokenizer)
        self.client = openai.OpenAI(
            base_url=base_url.rstrip("/"),
            api_key=read_api_key(api_key_env, api_key_file, "teacher") or "EMPTY",
            timeout=timeout,
            max_retries=max_retries,
        )

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------------------------------------ capabilities
    def capabilities(self) -> TeacherCapabilities:
        """What this server gives, probed once: scoring by echo, generated tokens' top-k, and whether its tokens
        are the local tokenizer's (a server that tokenises otherwise gives no usable logits)."""
        if self._capabilities is None:
            self._capabilities = self._probe()
        return self._capabilities

    def _probe(self) -> TeacherCapabilities:
        if self._pieces is None:
            return TeacherCapabilities(False, 0, "text only", "no local tokenizer to map the server's tokens to ids")
        from pipeline.data.prompts import chat_token_ids

        ids = chat_token_ids(self.tokenizer, PROBE[:1]) + self.tokenizer.encode(
            PROBE[1]["content"], add_special_tokens=False
        )
        try:
            echoed = self._echo(self.tokenizer.decode(ids), 1)
        except (openai.APIStatusError, AttributeError, TypeError, ValueError) as e:
            echoed, why = None, f"completions with echo and logprobs failed ({type(e).__name__}: {str(e)[:200]})"
        if echoed is not None:
            try:
                align(ids, echoed.tokens, self._pieces)
            except Misaligned as e:
                return TeacherCapabilities(
                    False, 0, "text only", f"the server's tokenizer is not the local one on the probe text: {e}"
                )
            why = None
        top = self._generation_top_logprobs()
        return TeacherCapabilities(echoed is not None, top, "completions echo + logprobs" if echoed else "chat", why)

    def _generation_top_logprobs(self) -> int:
        out = self.generate([PROBE[:1]], max_new_tokens=2, top_logprobs=self.top_k)[0]
        if out.logprobs and out.logprobs[0].top:
            return min(self.top_k, len(out.logprobs[0].top))
        return 0

    # ------------------------------------------------------------------------------------------------- scoring
    def _echo(self, text: str, logprobs: int) -> EchoedLogprobs:
        """The server's tokens of `text` with their log-probs and top `logprobs` (one token is generated: a
        `max_tokens` of 0 means "until the context is full" on some servers)."""
        try:
            resp = self.client.completions.create(
                model=self.model, prompt=text, max_tokens=1, temperature=0.0, echo=True, logprobs=logprobs
            )
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            raise TeacherUnreachable(
                f"teacher server {self.client.base_url} did not answer ({type(e).__name__}: {e}) "
                f"after {self.max_retries + 1} attempts"
            ) from e
        except openai.APIStatusError as e:
            if _retried(e.status_code):
                raise TeacherUnreachable(
                    f"teacher server {self.client.base_url}: HTTP {e.status_code} after {self.max_retries + 1} "
                    f"attempts ({str(e.message)[:200]})"
                ) from e
            raise
        lp = resp.choices[0].logprobs
        if lp is None or not lp.tokens or lp.top_logprobs is None:
            raise ValueError("the response has no prompt log-probs")
        return EchoedLogprobs(list(lp.tokens), list(lp.token_logprobs), list(lp.top_logprobs))

    def score(self, sequences: list[list[int]], starts: list[int], top_k: int) -> list[SoftTargets | None]:
        """The server's top-k next-token distribution over each sequence's completion (tokens `start..`), as
        `HFTeacher.score` gives it; None for a sequence the server tokenises differently (it trains on its text
        alone). Raises `TeacherUnreachable` when the server does not answer, so the caller redoes the batch."""
        caps = self.capabilities()
        if not caps.score:
            raise ValueError(f"teacher {self.teacher_id} cannot score sequences: {caps.refused}")
        assert self._pieces is not None

        def one(seq_start: tuple[list[int], int]) -> SoftTargets | None:
            seq, start = seq_start
            echoed = self._echo(self.tokenizer.decode(seq), top_k)
            try:
                return soft_targets(seq, start, echoed, self._pieces, top_k)
            except Misaligned:
                return None

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, zip(sequences, starts, strict=True)))

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
                logprobs=_token_logprobs(choice.logprobs),
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
        top_logprobs: int = 0,
    ) -> list[Generation]:
        """One completion per conversation, in order; failures come back flagged (`finish_reason == "error"`).

        `top_logprobs` > 0 asks for that many log-probs per generated token (`Generation.logprobs`, token texts
        as the server prints them; `soft_targets_of` maps them to local ids)."""
        body = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            body["seed"] = seed
        if top_logprobs:
            body |= {"logprobs": True, "top_logprobs": top_logprobs}
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda m: self._one(m, body), conversations))

    def soft_targets_of(self, generation: Generation, top_k: int) -> tuple[list[int], SoftTargets] | None:
        """A generation's own tokens as local ids and the top-k they were drawn from (row j: token j), or None
        when a token's text is not one local id (the tokenizers differ there)."""
        if self._pieces is None or not generation.logprobs:
            return None
        ids = [self._pieces.id_of(t.token) for t in generation.logprobs]
        if any(i is None for i in ids):
            return None
        echoed = EchoedLogprobs(
            [t.token for t in generation.logprobs],
            [t.logprob for t in generation.logprobs],
            [dict(t.top) for t in generation.logprobs],
        )
        local = [i for i in ids if i is not None]
        if self.tokenizer.decode(local) != generation.text:  # a token cut mid-character, read as its whole part
            return None
        targets = soft_targets(local, 0, echoed, self._pieces, top_k)
        return (local, targets) if targets is not None else None


def _token_logprobs(logprobs) -> list[TokenLogprob] | None:
    if logprobs is None or not getattr(logprobs, "content", None):
        return None
    return [
        TokenLogprob(c.token, c.logprob, [(t.token, t.logprob) for t in (c.top_logprobs or [])])
        for c in logprobs.content
    ]
