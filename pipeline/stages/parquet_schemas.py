"""The Parquet schemas of the dataset artifacts (`samples`, `eval_prompts`, `soft_targets`, `eval_report`), the
converters between their rows and the pipeline's types, and the reader of the `meta.json` stored beside the soft
targets. The artifacts themselves are declared in `artifact_specs`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from pipeline.data.sources import Prompt

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),  # <prompt_id>-<sample index>
        ("prompt_id", pa.string()),
        ("partition", pa.int32()),
        ("task", pa.string()),
        ("question", pa.string()),
        ("messages", MESSAGES),  # the conversation the teacher answered (instruction, worked examples, question)
        ("completion", pa.string()),  # the text the student trains on (canonical answer line when accepted)
        ("raw_completion", pa.string()),  # the teacher's text as generated
        ("extracted_answer", pa.string()),
        ("answer_source", pa.string()),  # the extractor that found it: tag, phrase or last
        ("reference_answer", pa.string()),
        ("score", pa.float64()),
        ("accepted", pa.bool_()),
        ("reject_reason", pa.string()),  # one of REJECT_REASONS; null when accepted
        ("error", pa.string()),  # the teacher's error for teacher_error / bad_prompt
        ("teacher_id", pa.string()),
        ("sampling", pa.string()),  # JSON: temperature, top_p, max_new_tokens, seed of the partition
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("latency_s", pa.float64()),  # wall time of the batch the sample was generated in
    ]
)


PROMPT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("task", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("metadata", pa.string()),  # JSON: what the task's verifier needs (the reasoning-gym entry)
    ]
)


def prompts_table(prompts: list[Prompt]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "prompt_id": p.prompt_id,
                "task": p.task,
                "question": p.question,
                "answer": p.answer,
                "metadata": json.dumps(p.metadata, default=str),
            }
            for p in prompts
        ],
        schema=PROMPT_SCHEMA,
    )


def prompt_from_row(row: dict) -> Prompt:
    """A held-out prompt read back from `eval_prompts`, ready for the verifiers."""
    return Prompt(row["prompt_id"], row["task"], row["question"], row["answer"], "eval", json.loads(row["metadata"]))


def soft_targets_schema(logprob_dtype: str = "float16") -> pa.Schema:
    lp = pa.float16() if logprob_dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("task", pa.string()),
            ("token_ids", pa.list_(pa.int32())),  # [L] prompt + completion + end-of-turn
            ("loss_mask", pa.list_(pa.bool_())),  # [L] true at i when token i + 1 is a completion token
            ("topk_ids", pa.list_(pa.list_(pa.int32()))),  # [positions with loss_mask][k]; empty: no soft targets
            ("topk_logprobs", pa.list_(pa.list_(lp))),  # [positions][k]
            ("tail_logmass", pa.list_(pa.float32())),  # [positions] log of the mass outside the top k
        ]
    )


def read_meta(path) -> dict:
    """The `meta.json` of a committed soft-targets artifact (tokenizer fingerprint, teacher, top-k)."""
    return json.loads((Path(path) / "meta.json").read_text())


REPORT_SCHEMA = pa.schema(
    [
        ("model", pa.string()),  # teacher or student
        ("prompt_id", pa.string()),
        ("task", pa.string()),
        ("question", pa.string()),
        ("reference_answer", pa.string()),
        ("completion", pa.string()),
        ("extracted_answer", pa.string()),
        ("correct", pa.bool_()),
        ("format_ok", pa.bool_()),  # the answer was stated in the taught format (tag or "The final answer is")
        ("reason", pa.string()),  # why it is not correct (truncated, no_answer, wrong_answer, …); null when correct
        ("finish_reason", pa.string()),
        ("completion_tokens", pa.int32()),
    ]
)
