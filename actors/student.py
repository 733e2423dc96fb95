"""The student role: a trained student loaded once per actor, answering held-out questions (`evaluate`).

`StudentWorker` is a plain class (tests call it without Ray); `ActorPool(StudentWorker, ...)` runs it as actors.
It fetches the `student` artifact itself through the artifact store, so it may run on any node.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

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
        self.student = Student(fetch(ref, tracking_uri, workdir), device, dtype, compile_decode_max_batch)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def answer(self, request: AnswerRequest) -> AnswerResult:
        t0 = time.perf_counter()
        answers = self.student.answer(request.questions, request.max_new_tokens, batch_size=request.batch_size)
        return AnswerResult(answers, time.perf_counter() - t0, self.worker)
