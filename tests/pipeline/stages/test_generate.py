"""Stage `generate` for real: the default teacher on a Ray actor pool, graded, written, tracked in MLflow."""

from __future__ import annotations

import json
import threading
import time

import pytest
import ray
from mlflow import MlflowClient

from pipeline import artifacts
from pipeline.artifacts import fetch
from pipeline.config import load_config
from pipeline.data.rejection import REJECT_REASONS
from pipeline.data.sources import DataError, split_file_prompts
from pipeline.data.verify import score
from pipeline.runner import StageFailed, run_pipeline
from pipeline.stages.artifact_specs import EVAL_PROMPTS, SAMPLES
from pipeline.stages.generate import Generate
from pipeline.stages.parquet_schemas import prompt_from_row

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def small(workdir, *overrides):
    return load_config(
        "tiny",
        [
            f"tracking.workdir={workdir}",
            "data.num_train_prompts=12",
            "data.num_eval_prompts=6",
            "teacher.max_new_tokens=40",
            "generate.shard_size=3",
            *overrides,
        ],
    )


def run(cfg):
    result = run_pipeline(cfg, [Generate()])
    out = result["generate"]
    tables = {
        name: artifacts.read_table(fetch(ref, result.tracking_uri, cfg.tracking.workdir), spec, ref.hash)
        for name, ref, spec in [
            ("samples", out.outputs["samples"], SAMPLES),
            ("eval_prompts", out.outputs["eval_prompts"], EVAL_PROMPTS),
        ]
    }
    run_data = MlflowClient(result.tracking_uri).get_run(out.run_id)
    return tables["samples"].to_pylist(), tables["eval_prompts"].to_pylist(), run_data, result


def test_every_sample_is_graded_written_once_and_tracked(tmp_path):
    cfg = small(tmp_path / "w")
    samples, held_out, mlrun, result = run(cfg)
    assert len(samples) == 12 and len({s["sample_id"] for s in samples}) == 12
    assert sorted({s["partition"] for s in samples}) == [0, 1, 2, 3]
    assert not {s["question"] for s in samples} & {p["question"] for p in held_out} and len(held_out) == 6
    accepted = [s for s in samples if s["accepted"]]
    assert accepted, "the default teacher solves some of the default mixture"
    for s in samples:
        if s["accepted"]:
            assert s["reject_reason"] is None and s["score"] == 1.0
            assert s["completion"].endswith(f"The final answer is {s['extracted_answer']}.")
        else:
            assert s["reject_reason"] in REJECT_REASONS
        assert s["teacher_id"].startswith("hf:SmolLM2-135M-Instruct") and s["messages"][-1]["content"] == s["question"]
        assert json.loads(s["sampling"])["max_new_tokens"] == 40
    for p in held_out:  # the held-out split can still be graded by its task's verifier
        prompt = prompt_from_row(p)
        assert score(prompt, prompt.answer) == 1.0

    m = mlrun.data.metrics
    assert m["samples"] == 12 and m["acceptance_rate"] == pytest.approx(len(accepted) / 12)
    assert m["tokens_per_s"] > 0 and m["actor_0.tokens_per_s"] > 0 and m["actor_1.tokens_per_s"] > 0
    assert sum(m[f"rejected.{r}"] for r in REJECT_REASONS) == 12 - len(accepted)
    per_task = {t: [s["accepted"] for s in samples if s["task"] == t] for t in {s["task"] for s in samples}}
    assert all(m[f"acceptance_rate.{t}"] == pytest.approx(sum(v) / len(v)) for t, v in per_task.items())
    [dataset] = mlrun.inputs.dataset_inputs
    assert dataset.dataset.name == "samples" and dataset.tags[0].value == "output"
    client = MlflowClient(result.tracking_uri)
    assert "samples_preview.json" in {f.path for f in client.list_artifacts(mlrun.info.run_id)}

    again = run_pipeline(cfg, [Generate()])
    assert again["generate"].cache_hit


def _kill_one_teacher_once_a_shard_exists(workdir, done: list):
    """Watch the stage's resume space; when the first shard lands, kill a teacher actor that still has work."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if list(workdir.glob("resume/generate-*/shards/part-*.parquet")):
            teachers = [a for a in ray.util.list_named_actors(all_namespaces=True) if ".teacher-" in a["name"]]
            if teachers:
                ray.kill(ray.get_actor(teachers[0]["name"], namespace=teachers[0]["namespace"]), no_restart=True)
                done.append(teachers[0]["name"])
                return
        time.sleep(0.2)


def test_a_teacher_actor_killed_mid_stage_loses_and_duplicates_nothing(tmp_path):
    overrides = ("data.num_train_prompts=16", "generate.shard_size=2")
    calm, *_ = run(small(tmp_path / "calm", *overrides))
    killed_names: list[str] = []
    watcher = threading.Thread(target=_kill_one_teacher_once_a_shard_exists, args=(tmp_path / "hit", killed_names))
    watcher.start()
    hit, _, mlrun, _ = run(small(tmp_path / "hit", *overrides))
    watcher.join()
    assert killed_names, "the test never found a teacher actor to kill"
    assert mlrun.data.metrics["replaced_actors"] == 1
    key = lambda rows: sorted((s["sample_id"], s["completion"], s["accepted"]) for s in rows)
    assert len(hit) == len({s["sample_id"] for s in hit}) == 16
    assert key(hit) == key(calm)
    assert {s["sample_id"] for s in hit if s["accepted"]} == {s["sample_id"] for s in calm if s["accepted"]}


def test_bad_prompts_are_flagged_and_everything_else_survives(tmp_path):
    rows = [{"prompt": f"What is {i} + 2?", "answer": str(i + 2), "task": "math"} for i in range(5)]
    rows += [{"prompt": "   ", "answer": "1"}, {"prompt": "word " * 9000, "answer": "word"}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    overrides = ("data.source=file", f"data.path={data}", "data.num_eval_prompts=1", "generate.shard_size=4")
    seed = next(
        s
        for s in range(50)
        if not any(
            not p.question.strip() or len(p.question) > 1000
            for p in split_file_prompts(small(tmp_path, *overrides, f"data.seed={s}").data)["eval"]
        )
    )
    samples, *_ = run(small(tmp_path / "w", *overrides, f"data.seed={seed}"))
    assert len(samples) == 6
    flagged = {s["question"][:5]: s for s in samples if s["reject_reason"] == "bad_prompt"}
    assert set(flagged) == {"   ", "word "}
    assert flagged["   "]["error"] == "empty prompt"
    assert "prompt too long" in flagged["word "]["error"] and "context of 8192" in flagged["word "]["error"]
    good = [s for s in samples if s["task"] == "math"]
    assert len(good) == 4 and all(s["finish_reason"] in ("stop", "length") for s in good)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("data.tasks=[{name: no_such_task}]",), "unknown reasoning-gym task 'no_such_task' in data.tasks"),
        (("data.source=file", "data.path={missing_col}"), "row 0 has no answer column"),
    ],
)
def test_bad_sources_fail_the_stage_with_a_clear_error_and_commit_nothing(tmp_path, overrides, message):
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "What is 1 + 1?"}) + "\n")
    cfg = small(tmp_path / "w", *(o.replace("{missing_col}", str(tmp_path / "q.jsonl")) for o in overrides))
    with pytest.raises(StageFailed, match=message) as err:
        run_pipeline(cfg, [Generate()])
    assert isinstance(err.value.cause, DataError)
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    mlrun = client.get_run(err.value.run_id)
    assert mlrun.info.status == "FAILED" and not client.list_artifacts(mlrun.info.run_id)


def test_openai_teacher_failures_become_flagged_samples(tmp_path, openai_server):
    url, faults = openai_server
    cfg = small(
        tmp_path / "w",
        "teacher.backend=openai",
        f"teacher.base_url={url}",
        "teacher.model=smollm2",
        "model.init=scratch",  # a remote teacher without local weights has nothing to convert
        "teacher.num_actors=1",
        "teacher.batch_size=1",
        "teacher.max_retries=1",
        "data.num_train_prompts=6",
        "generate.shard_size=6",
    )
    faults.update(fail=4, status=500)  # two attempts each: the first two samples fail for good, the rest succeed
    samples, _, mlrun, _ = run(cfg)
    faults.update(fail=0)
    assert len(samples) == 6
    errors = [s for s in samples if s["reject_reason"] == "teacher_error"]
    assert len(errors) == 2 and all("HTTP 500" in s["error"] and "after 2 attempts" in s["error"] for s in errors)
    assert all(s["finish_reason"] != "error" for s in samples if s not in errors)
    assert mlrun.data.metrics["rejected.teacher_error"] == 2
    assert {s["teacher_id"] for s in samples} == {f"openai:smollm2@{url}"}
