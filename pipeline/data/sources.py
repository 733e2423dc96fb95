"""Prompt sources: a reasoning-gym task mixture, or a user dataset (Parquet or JSONL).

The held-out split is drawn first, from its own seed range, and the training split never contains a question the
held-out split has (checked by normalised question text, not only by seed), so evaluation is never on trained data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pipeline.config import DataConfig, TaskMix

Split = Literal["train", "eval"]
_SEED_STRIDE = 10_000_000  # reasoning-gym seeds item i with (seed + i): eval and train ranges never meet


class DataError(ValueError):
    """A prompt source cannot be used; the message names the task, file or column."""


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    task: str
    question: str
    answer: str
    split: Split
    metadata: dict[str, Any] = field(default_factory=dict)  # what the task's verifier needs (reasoning-gym entry)


def _normalise(question: str) -> str:
    return " ".join(question.lower().split())


def _prompt_id(task: str, question: str) -> str:
    return hashlib.sha256(f"{task}\0{_normalise(question)}".encode()).hexdigest()[:16]


def allocate(tasks: list[TaskMix], total: int) -> dict[str, int]:
    """Split `total` prompts across tasks in proportion to their weights (largest remainder, deterministic)."""
    weight = sum(t.weight for t in tasks)
    exact = [(t.name, total * t.weight / weight) for t in tasks]
    counts = {name: int(x) for name, x in exact}
    for name, _ in sorted(exact, key=lambda nx: (-(nx[1] - int(nx[1])), nx[0]))[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def _gym_dataset(task: TaskMix, seed: int, size: int):
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(task.name, seed=seed, size=size, **task.params)
    except (KeyError, ValueError, TypeError) as e:
        if "not registered" in str(e) or isinstance(e, KeyError):
            raise DataError(f"unknown reasoning-gym task {task.name!r} in data.tasks") from None
        raise DataError(f"reasoning-gym task {task.name!r}: invalid params {task.params}: {e}") from None


def reasoning_gym_prompts(cfg: DataConfig) -> dict[Split, list[Prompt]]:
    """Both splits of the configured mixture: `num_eval_prompts` held out, `num_train_prompts` disjoint from them."""
    from pipeline.data.prompts import few_shot_questions

    out: dict[Split, list[Prompt]] = {"eval": [], "train": []}
    shown = {_normalise(q) for q in few_shot_questions()}  # answered in the prompt itself: in neither split
    seen: set[str] = set()
    for split, total, base in (
        ("eval", cfg.num_eval_prompts, cfg.seed * 2 * _SEED_STRIDE),
        ("train", cfg.num_train_prompts, (cfg.seed * 2 + 1) * _SEED_STRIDE),
    ):
        counts = allocate(cfg.tasks, total)
        for task in cfg.tasks:
            want = counts[task.name]
            size, taken = max(want * 2, 8), []
            while len(taken) < want:
                ds = _gym_dataset(task, base, size)
                taken = []
                for entry in ds:
                    key = _normalise(entry["question"])
                    if key in seen or key in shown or any(_normalise(p.question) == key for p in taken):
                        continue  # held-out question, or a repeat: never trained on, never counted twice
                    taken.append(
                        Prompt(
                            _prompt_id(task.name, entry["question"]),
                            task.name,
                            entry["question"],
                            str(entry["answer"]),
                            split,
                            {"entry": entry},
                        )
                    )
                    if len(taken) == want:
                        break
                if len(taken) < want:
                    if size >= 64 * max(want, 8):
                        raise DataError(
                            f"reasoning-gym task {task.name!r} yields only {len(taken)} distinct "
                            f"{split} questions of the {want} asked; widen its params"
                        )
                    size *= 4
            out[split].extend(taken)
            if split == "eval":
                seen.update(_normalise(p.question) for p in taken)
    assert not {_normalise(p.question) for p in out["train"]} & seen, "held-out question in the training split"
    return out


REQUIRED = ("prompt", "answer")


def file_prompts(path: str | Path, split: Split = "train") -> list[Prompt]:
    """A user dataset: Parquet or JSONL rows with `prompt` and `answer` (and optional `task`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    else:
        raise DataError(f"data.path {path}: expected a .parquet or .jsonl file")
    prompts = []
    for i, row in enumerate(rows):
        missing = [c for c in REQUIRED if c not in row or row[c] is None]
        if missing:
            raise DataError(f"{path}: row {i} has no {' or '.join(missing)} column (required: {', '.join(REQUIRED)})")
        task = str(row.get("task") or "user")
        prompts.append(
            Prompt(_prompt_id(task, str(row["prompt"])), task, str(row["prompt"]), str(row["answer"]), split)
        )
    return prompts


def split_file_prompts(cfg: DataConfig) -> dict[Split, list[Prompt]]:
    """A user dataset split in two: `num_eval_prompts` held out (at most half the rows), then training prompts.

    Rows are ordered by a seeded hash of their prompt id, so the split is deterministic and does not depend on the
    file's row order; a question that appears twice is used once.
    """
    unique = list({p.prompt_id: p for p in reversed(file_prompts(cfg.path))}.values())[::-1]
    order = sorted(unique, key=lambda p: hashlib.sha256(f"{cfg.seed}:{p.prompt_id}".encode()).hexdigest())
    n_eval = min(cfg.num_eval_prompts, len(order) // 2)
    return {
        "eval": [replace(p, split="eval") for p in order[:n_eval]],
        "train": [replace(p, split="train") for p in order[n_eval : n_eval + cfg.num_train_prompts]],
    }


def load_prompts(cfg: DataConfig) -> dict[Split, list[Prompt]]:
    """Both splits of the configured source."""
    return reasoning_gym_prompts(cfg) if cfg.source == "reasoning_gym" else split_file_prompts(cfg)
