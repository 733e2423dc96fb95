"""The stage contract: every artifact that flows between stages, with its declared type (and, for datasets, its
Parquet schema). Every stage imports its inputs' and outputs' specs from here, never from another stage.

    generate ─ samples ─> distill ─ soft_targets ─> train ─ trained_student ─> refine ─ student ─> evaluate
    generate ─ samples ─> convert ─ initial_student ─> train, evaluate
    generate ─ eval_prompts ─> evaluate ─ eval_report ─> register ─ registration, exports
    register ─ registration ─> serve ─ endpoint      (refine passes the trained student on when it is off)

The Parquet schemas of the datasets live in `parquet_schemas`; the typed results stored beside a checkpoint or a
report (conversion.json, refine.json, summary.json, register's and serve's JSON files) in `results`, which alone
writes and reads them.
"""

from __future__ import annotations

from pipeline.artifacts import ArtifactSpec
from pipeline.stages.parquet_schemas import PROMPT_SCHEMA, REPORT_SCHEMA, SAMPLE_SCHEMA, soft_targets_schema

SAMPLES = ArtifactSpec(
    "samples",
    "dataset",
    SAMPLE_SCHEMA,
    "every teacher sample of the training prompts, accepted or flagged with its reason",
)

EVAL_PROMPTS = ArtifactSpec(
    "eval_prompts", "dataset", PROMPT_SCHEMA, "held-out prompts for evaluate, disjoint from the training prompts"
)

SOFT_TARGETS = ArtifactSpec(
    "soft_targets",
    "dataset",
    soft_targets_schema("float16"),
    "per accepted sample: token ids, loss mask, teacher top-k ids + log-probs, tail mass; "
    "tokenizer/ and meta.json beside",
    variants=(soft_targets_schema("float32"),),
)

INITIAL_STUDENT = ArtifactSpec(
    "initial_student",
    "checkpoint",
    description="the student before training: converted "
    "from the teacher's weights (or random, model.init scratch), with its tokenizer and "
    "conversion.json (kept layers, rope pairs, KL and perplexity vs the teacher, costs)",
)

TRAINED_STUDENT = ArtifactSpec(
    "trained_student",
    "checkpoint",
    description="the MoE student distilled by train: safetensors weights (router "
    "biases included), config.json and the teacher's tokenizer",
)

STUDENT = ArtifactSpec(
    "student",
    "checkpoint",
    description="the student evaluate judges and register registers: refine's (with refine.json, what refining "
    "it did and cost), or with refine off the trained student itself",
)

EVAL_REPORT = ArtifactSpec(
    "eval_report",
    "dataset",
    REPORT_SCHEMA,
    "teacher and student answers to the held-out prompts, graded; summary.json beside",
)

REGISTRATION = ArtifactSpec("registration", "files", description="registry name, version, alias and the gate's reason")

EXPORTS = ArtifactSpec(
    "exports", "files", description="the student for other engines: hf/ (transformers, vLLM) and gguf/ (llama.cpp)"
)

ENDPOINT = ArtifactSpec("endpoint", "files", description="URL of the OpenAI-compatible app and the version it serves")
