"""The student role: a trained student loaded once per actor, answering held-out questions (`evaluate`) or
sampling its own attempts at training prompts (`refine`'s rollouts, with the learner's latest weights).

`StudentWorker` is a plain class (tests call it without Ray); `ActorPool(StudentWorker, ...)` runs it as actors.
It fetches the `student` artifact itself through the artifact store, so it may run on any node.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import ArtifactRef
from pipeline.model.precision import InferenceDtype
from pipeline.student import Answer, Student


@dataclass
class AnswerRequest:
    questions: list[str]
    max_new_tokens: int
    batch_size: int


@dataclass
class AnswerResult:
    answers: list[Answer]
    seconds: float
    worker: str


@dataclass
class Weights:
    """A version of the student's weights for the rollout actors: a state dict, or a `put_tensors` ObjectRef to one
    (passed inside a request, so Ray hands it over unresolved and each actor fetches it once per version)."""

    version: int
    state: Any


@dataclass
class RolloutRequest:
    prompts: list[list[int]]  # token ids of each prompt (the student's conversation, ending at its turn)
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    seed: int  # completion j of prompt i samples with seed + i * samples_per_prompt + j: a retry reproduces it
    weights: Weights | None = None  # None: the weights the actor has


@dataclass
class RolloutResult:
    completions: list[list[tuple[list[int], str]]]  # per prompt, its samples: (token ids, finish reason)
    seconds: float
    tokens: int  # completion tokens sampled
    weights_version: int
    worker: str


class StudentWorker:
    """Loads the student artifact `ref` (verified against its hash) and answers greedily.

    Args:
        ref: the committed `student` artifact.
        tracking_uri: the MLflow store it lives in.
        workdir: where a remote artifact is downloaded and cached.
        num_threads: CPU threads for torch (the actor's CPU share).
        dtype: the inference dtype setting (`pipeline.model.precision`), resolved on this actor's device.
        compile_decode_max_batch: compile the decode step up to this batch size (0: off).
    """

    def __init__(
        self,
        ref: ArtifactRef,
        tracking_uri: str,
        workdir: str,
        num_threads: int | None = None,
        dtype: InferenceDtype = "float32",
        compile_decode_max_batch: int = 0,
    ):
        import torch

        from pipeline.artifacts import fetch

        if num_threads:
            torch.set_num_threads(num_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.student = Student(fetch(ref, tracking_uri, Path(workdir)), device, dtype, compile_decode_max_batch)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.weights_version = 0  # the artifact's own weights

    def load_weights(self, weights: Weights) -> None:
        """Take `weights` (fetched from the object store when a ref) unless this actor already has that version."""
        if weights.version == self.weights_version:
            return
        from actors.object_store import get_tensors

        state = get_tensors(weights.state)  # views of the object store's copy: load_state_dict copies from them
        model = self.student.model
        model.load_state_dict({k: v.to(next(model.parameters()).dtype) if v.is_floating_point() else v
                               for k, v in state.items()})  # fmt: skip
        self.weights_version = weights.version

    def rollout(self, request: RolloutRequest) -> RolloutResult:
        """`samples_per_prompt` sampled completions of every prompt, each up to the end-of-turn token."""
        from pipeline.model.generate import SamplingParams, generate

        t0 = time.perf_counter()
        if request.weights is not None:
            self.load_weights(request.weights)
        eos = self.student.tokenizer.eos_token_id
        G = request.samples_per_prompt
        prompts = [p for p in request.prompts for _ in range(G)]
        params = [
            SamplingParams(
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                stop_token_ids=(eos,),
                seed=request.seed + i,
            )
            for i in range(len(prompts))
        ]
        done = generate(self.student.model, prompts, params, self.student.compiled)
        flat = [(c.tokens, c.finish_reason or "length") for c in done]
        completions = [flat[i * G : (i + 1) * G] for i in range(len(request.prompts))]
        tokens = sum(len(t) for t, _ in flat)
        return RolloutResult(completions, time.perf_counter() - t0, tokens, self.weights_version, self.worker)

    def answer(self, request: AnswerRequest) -> AnswerResult:
        t0 = time.perf_counter()
        answers = self.student.answer(request.questions, request.max_new_tokens, batch_size=request.batch_size)
        return AnswerResult(answers, time.perf_counter() - t0, self.worker)
