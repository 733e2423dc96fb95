"""A completion as every generator returns it: the teacher backends, and the student when it is graded beside
the teacher. Rejection sampling (`rejection.judge`) and the evaluation grade these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    """One generated token as a server reports it: its text, its log-prob, and the top-k (text, log-prob) of the
    distribution it was drawn from."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence), "length" (max_new_tokens), "error" or "bad_prompt"
    seconds: float  # wall time of the whole batch (or request) this generation came from
    error: str | None = None  # why (finish_reason "error" or "bad_prompt"); the sample is kept, flagged
    logprobs: list[TokenLogprob] | None = None  # per generated token, when asked for and the teacher gives them
