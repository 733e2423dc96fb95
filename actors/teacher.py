"""The teacher role: one loaded teacher model per actor, generating for partitions of prompts (`generate`) or
scoring accepted samples for their soft targets (`distill`).

`TeacherWorker` is a plain class (tests call it without Ray); `ActorPool(TeacherWorker, ...)` runs it as actors.
A partition is generated in fixed chunks of `batch_size` conversations with a seed derived from the partition's
seed and the chunk's position, so a partition retried on another actor reproduces the same samples.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import TeacherConfig
from pipeline.data.generation import Generation
from pipeline.data.prompts import TeacherContext
from pipeline.teacher import load_teacher, prepare_teacher
from pipeline.teacher.base import SoftTargets, TeacherCapabilities


@dataclass
class GenerateRequest:
    conversations: list[list[dict[str, str]]]
    seed: int


@dataclass
class GenerateResult:
    generations: list[Generation]
    seconds: float  # busy time of this actor on the request
    teacher_id: str
    worker: str  # host:pid of the actor that did it
    node_id: str = ""
    completion_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.completion_tokens = sum(g.completion_tokens for g in self.generations)


@dataclass
class ScoreRequest:
    """Accepted samples to score: the student's training text of each, read by the teacher after `context`."""

    samples: list[tuple[str, str, str]]  # (task, question, completion)
    top_k: int
    batch_size: int
    context: TeacherContext = "best"  # what the teacher reads before the completion (`distill.teacher_context`)


@dataclass
class ScoreResult:
    sequences: list[tuple[list[int], int]]  # (token ids of the training text, first completion index) per sample
    # per sample, one row per completion token of its training text (the student's positions, whatever context the
    # teacher read); None: the teacher could not score this one (it trains on its text alone)
    targets: list[SoftTargets | None]
    seconds: float
    tokens: int  # tokens the teacher read (whole sequences, its context included)
    teacher_id: str


@dataclass
class TokenScoreRequest:
    """Given token sequences scored from `starts[i]` on (`refine`: the student's completions after the teacher's
    own context, so the ids are the student's and the context is the teacher's best prompt)."""

    sequences: list[list[int]]
    starts: list[int]
    top_k: int
    batch_size: int


@dataclass
class TokenScoreResult:
    targets: list[SoftTargets | None]  # None: the teacher could not score this one
    seconds: float
    tokens: int  # tokens scored (whole sequences, context included)


class TeacherWorker:
    """Loads the configured teacher once and generates batches with the configured sampling settings.

    Args:
        cfg: the teacher section of the run config.
        cache_dir: where a GGUF teacher is dequantized once per node.
        num_threads: CPU threads for torch (the actor's CPU share); None leaves torch's default.
        for_scoring, vocabulary: as `load_teacher` takes them (a scoring teacher; a remote one's local tokenizer).
    """

    def __init__(
        self,
        cfg: TeacherConfig,
        cache_dir: str | Path,
        num_threads: int | None = None,
        for_scoring: bool = False,
        vocabulary: str | None = None,
    ):
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.cfg = cfg
        self.teacher = load_teacher(cfg, cache_dir, for_scoring=for_scoring, vocabulary=vocabulary)
        self.teacher_id = self.teacher.teacher_id
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def capabilities(self) -> TeacherCapabilities:
        return self.teacher.capabilities()

    def identity(self) -> str:
        return self.teacher_id

    def score(self, request: ScoreRequest) -> ScoreResult:
        """Soft targets for the completion of each sample's student training text, the teacher reading that
        completion's token ids after `request.context` (one forward pass per batch)."""
        from pipeline.distill.targets import encode, teacher_view

        t0 = time.perf_counter()
        tokenizer = self.teacher.tokenizer
        sequences = [encode(tokenizer, q, c) for _, q, c in request.samples]
        views = [
            teacher_view(tokenizer, task, q, ids, start, request.context)
            for (task, q, _), (ids, start) in zip(request.samples, sequences, strict=True)
        ]
        targets: list[SoftTargets | None] = []
        for start in range(0, len(views), request.batch_size):
            chunk = views[start : start + request.batch_size]
            targets += self.teacher.score([s for s, _ in chunk], [i for _, i in chunk], request.top_k)
        return ScoreResult(sequences, targets, time.perf_counter() - t0, sum(len(s) for s, _ in views), self.teacher_id)

    def score_tokens(self, request: TokenScoreRequest) -> TokenScoreResult:
        """The teacher's top-k (and the sequence's own token's log-prob) at every position from each start on."""
        t0 = time.perf_counter()
        targets: list[SoftTargets | None] = []
        for start in range(0, len(request.sequences), request.batch_size):
            end = start + request.batch_size
            targets += self.teacher.score(request.sequences[start:end], request.starts[start:end], request.top_k)
        return TokenScoreResult(targets, time.perf_counter() - t0, sum(map(len, request.sequences)))

    def generate(self, request: GenerateRequest) -> GenerateResult:
        t0 = time.perf_counter()
        out: list[Generation] = []
        size = self.cfg.batch_size
        for chunk, start in enumerate(range(0, len(request.conversations), size)):
            out += self.teacher.generate(
                request.conversations[start : start + size],
                self.cfg.max_new_tokens,
                self.cfg.temperature,
                self.cfg.top_p,
                seed=request.seed + chunk,
            )
        return GenerateResult(out, time.perf_counter() - t0, self.teacher_id, self.worker, _node_id())


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def teacher_pool(
    cfg: TeacherConfig,
    name: str,
    max_in_flight_per_actor: int = 2,
    scheduling_strategy: str = "SPREAD",
    for_scoring: bool = False,
    vocabulary: str | None = None,
):
    """An `ActorPool` of `cfg.num_actors` teacher actors with the configured resources.

    The local weights are resolved once on the calling node first (a GGUF is dequantized once there, not once per
    actor), and a remote teacher's `vocabulary` too.
    """
    from actors.pool import ActorPool, torch_threads
    from pipeline.teacher.hf import default_cache_dir, resolve_model_dir

    cache_dir = default_cache_dir()
    prepare_teacher(cfg, cache_dir)
    if vocabulary is not None:
        resolve_model_dir(vocabulary, cache_dir)
    threads = torch_threads(cfg.num_cpus_per_actor, cfg.num_gpus_per_actor)
    return ActorPool(
        TeacherWorker,
        (cfg, str(cache_dir), threads, for_scoring, vocabulary),
        size=cfg.num_actors,
        name=name,
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor,
        max_in_flight_per_actor=max_in_flight_per_actor,
        scheduling_strategy=scheduling_strategy,
    )
