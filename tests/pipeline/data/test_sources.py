from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig, TaskMix
from pipeline.data.sources import DataError, allocate, file_prompts, reasoning_gym_prompts


def _norm(q):
    return " ".join(q.lower().split())


def test_held_out_split_is_disjoint_from_training_even_for_tiny_question_spaces():
    # one-digit two-term sums: only ~100 distinct questions, so seed ranges alone would collide
    cfg = DataConfig(
        tasks=[
            TaskMix(
                name="basic_arithmetic",
                params=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=["+"]),
            )
        ],
        num_train_prompts=40,
        num_eval_prompts=30,
        seed=3,
    )
    splits = reasoning_gym_prompts(cfg)
    assert len(splits["train"]) == 40 and len(splits["eval"]) == 30
    assert not {_norm(p.question) for p in splits["train"]} & {_norm(p.question) for p in splits["eval"]}
    assert len({p.prompt_id for p in splits["train"]}) == 40  # no repeats inside a split either
    assert reasoning_gym_prompts(cfg) == splits  # deterministic


def test_default_mixture_follows_weights():
    cfg = DataConfig()
    splits = reasoning_gym_prompts(cfg)
    counts = {t.name: sum(p.task == t.name for p in splits["train"]) for t in cfg.tasks}
    assert counts == allocate(cfg.tasks, cfg.num_train_prompts) and sum(counts.values()) == cfg.num_train_prompts
    assert allocate([TaskMix(name="a", weight=3), TaskMix(name="b", weight=1)], 10) == {"a": 8, "b": 2}


def test_unknown_task_is_named():
    with pytest.raises(DataError, match="unknown reasoning-gym task 'no_such_task'"):
        reasoning_gym_prompts(DataConfig(tasks=[TaskMix(name="no_such_task")]))


def test_user_datasets_parquet_and_jsonl(tmp_path):
    pq.write_table(
        pa.table({"prompt": ["1+1?", "Capital of France?"], "answer": ["2", "Paris"], "task": ["math", None]}),
        tmp_path / "d.parquet",
    )
    prompts = file_prompts(tmp_path / "d.parquet")
    assert [(p.task, p.answer) for p in prompts] == [("math", "2"), ("user", "Paris")]
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n\n")
    assert file_prompts(tmp_path / "d.jsonl")[0].question == "2+2?"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "x"}\n', r"row 0 has no answer column"),
        ('{"answer": "x"}\n', r"row 0 has no prompt column"),
        ('{"prompt": "x", "answer": "y"}\nnot json\n', r"d.jsonl:2: not valid JSON"),
    ],
)
def test_bad_user_dataset_is_named(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        file_prompts(tmp_path / "d.jsonl")


def test_missing_or_unsupported_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        file_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"expected a .parquet or .jsonl file"):
        file_prompts(tmp_path / "d.csv")


def test_a_user_dataset_is_split_deterministically_without_repeats(tmp_path):
    from pipeline.data.sources import load_prompts

    rows = [{"prompt": f"{i} + 1?", "answer": str(i + 1)} for i in range(20)] + [{"prompt": "3 + 1?", "answer": "4"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source="file", path=str(tmp_path / "d.jsonl"), num_eval_prompts=5, num_train_prompts=100)
    splits = load_prompts(cfg)
    assert len(splits["eval"]) == 5 and len(splits["train"]) == 15  # 20 distinct questions
    assert not {p.prompt_id for p in splits["eval"]} & {p.prompt_id for p in splits["train"]}
    assert load_prompts(cfg) == splits and {p.split for p in splits["eval"]} == {"eval"}
