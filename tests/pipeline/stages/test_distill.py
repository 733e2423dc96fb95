"""Stage `distill` for real: generate → distill on the default teacher through Ray and MLflow."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient
from transformers import AutoTokenizer

from pipeline import artifacts
from pipeline.artifacts import fetch
from pipeline.config import load_config
from pipeline.distill import targets as T
from pipeline.runner import StageFailed, run_pipeline
from pipeline.stages.artifact_specs import SAMPLES, SOFT_TARGETS
from pipeline.stages.distill import Distill
from pipeline.stages.generate import Generate
from pipeline.stages.parquet_schemas import read_meta

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def small(workdir, *overrides):
    return load_config(
        "tiny",
        [
            f"tracking.workdir={workdir}",
            "data.num_train_prompts=9",
            "data.num_eval_prompts=3",
            "teacher.max_new_tokens=40",
            "generate.shard_size=3",
            "distill.shard_size=2",
            *overrides,
        ],
    )


def run(cfg):
    result = run_pipeline(cfg, [Generate(), Distill()])

    def read(stage, name, spec):
        ref = result[stage].outputs[name]
        path = fetch(ref, result.tracking_uri, cfg.tracking.workdir)
        return artifacts.read_table(path, spec, ref.hash).to_pylist(), path

    (samples, _), (targets, path) = read("generate", "samples", SAMPLES), read("distill", "soft_targets", SOFT_TARGETS)
    return samples, targets, path, MlflowClient(result.tracking_uri).get_run(result["distill"].run_id)


def test_every_accepted_sample_gets_aligned_top_k_targets_and_the_teachers_tokenizer(tmp_path):
    samples, targets, path, mlrun = run(small(tmp_path / "w", "distill.logprob_dtype=float32", "distill.top_k=8"))
    accepted = {s["sample_id"]: s for s in samples if s["accepted"]}
    assert accepted and sorted(t["sample_id"] for t in targets) == sorted(accepted)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    meta = read_meta(path)
    T.check_tokenizer(tokenizer, meta["tokenizer_fingerprint"])
    assert meta["top_k"] == 8 and meta["soft_targets"] and meta["teacher_id"].startswith("hf:SmolLM2")
    assert meta["teacher_context"] == "best"
    matches, tokens = 0, 0
    for t in targets:
        s = accepted[t["sample_id"]]
        assert (t["token_ids"], t["loss_mask"].index(True) + 1) == T.encode(tokenizer, s["question"], s["completion"])
        assert sum(t["loss_mask"]) == len(t["topk_ids"]) == len(t["tail_logmass"]) and len(t["topk_ids"][0]) == 8
        lp = np.array(t["topk_logprobs"])
        assert (np.diff(lp, axis=1) <= 0).all() and (lp <= 0).all()
        completion = [tok for tok, m in zip(t["token_ids"][1:], t["loss_mask"], strict=False) if m]
        top1 = np.array(t["topk_ids"])[:, 0]
        assert (top1 == np.array(completion)).mean() > 0.6  # the teacher mostly agrees with its accepted answers
        matches, tokens = matches + int((top1 == np.array(completion)).sum()), tokens + len(completion)
    m = mlrun.data.metrics
    # after its worked examples the teacher's top-1 is its accepted token almost everywhere (see the stage's doc)
    assert m["teacher_top1_agreement"] == pytest.approx(matches / tokens) and m["teacher_top1_agreement"] > 0.9
    assert m["accepted_token_logprob"] < 0 and all(
        f"teacher_top1_agreement.{s['task']}" in m for s in accepted.values()
    )
    assert 0 < m["topk_mass_p5"] <= m["topk_mass_mean"] <= 1 and m["score_tokens_per_s"] > 0
    # a few hundred bytes here, most of it Parquet footers of tiny shards; the dense fp16 distribution is 98,304
    assert m["bytes_per_token"] < 1000
    assert mlrun.data.tags["moeforge.tokenizer_fingerprint"] == meta["tokenizer_fingerprint"]


def test_a_teacher_without_logits_falls_back_to_sequence_level_with_a_warning(tmp_path, openai_server):
    url, _ = openai_server
    samples, targets, path, mlrun = run(
        small(
            tmp_path / "w",
            "teacher.backend=openai",
            f"teacher.base_url={url}",
            "teacher.model=smollm2",
            "teacher.num_actors=1",
            "model.init=scratch",  # no local weights: the soft targets' ids come from distill.tokenizer
            "data.num_train_prompts=4",
            "generate.shard_size=4",
        )
    )
    assert len(targets) == sum(s["accepted"] for s in samples) > 0
    assert all(t["topk_ids"] == [] and any(t["loss_mask"]) for t in targets)
    assert "sequence-level distillation" in mlrun.data.tags["moeforge.warning"]
    assert read_meta(path)["soft_targets"] is False


def test_nothing_accepted_is_a_clear_error(tmp_path):
    with pytest.raises(StageFailed, match="no accepted samples to distill"):
        run_pipeline(small(tmp_path / "w", "teacher.max_new_tokens=1"), [Generate(), Distill()])


# ------------------------------------------------------------------------------------- a remote teacher's logits
def remote(workdir, server, *overrides):
    """A run whose teacher is llama-cpp-python's server on the default teacher's GGUF (its local copy named as
    `teacher.weights`, so its tokenizer maps the server's tokens to ids): one partition per sample."""
    return small(
        workdir,
        "teacher.backend=openai",
        f"teacher.base_url={server.base_url}",
        f"teacher.model={server.MODEL}",
        "teacher.weights=smollm2-135m-instruct",
        "teacher.num_actors=1",
        "teacher.max_retries=2",
        "distill.shard_size=1",
        "distill.max_attempts=12",  # each failed attempt spends ~1.5 s on its retries: the server is back by then
        *overrides,
    )


def test_a_remote_teacher_killed_mid_partition_is_redone_and_every_sample_has_logits_once(tmp_path, llama_cpp_server):
    """Logit KD, not the fallback, from a real server; SIGKILLed while a partition is being scored and brought back
    on its port 5 s later: the partition fails past the client's retries, is scored again whole, and no sample is
    lost or written twice."""
    import threading
    import time

    cfg = remote(tmp_path / "w", llama_cpp_server)
    run_pipeline(cfg, [Generate()])  # the samples first, so the kill lands in distill
    shards = tmp_path / "w" / "resume"
    killed = threading.Event()

    def kill_after_the_first_shard():
        deadline = time.monotonic() + 300
        while not list(shards.glob("distill-*/shards/part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        llama_cpp_server.kill()
        killed.set()
        time.sleep(5)  # longer than the client's own retries (0.5 s + 1 s of back-off): the partition fails
        llama_cpp_server.start()

    watcher = threading.Thread(target=kill_after_the_first_shard, daemon=True)
    watcher.start()
    try:
        samples, targets, path, mlrun = run(cfg)
    finally:
        watcher.join(timeout=300)
        if llama_cpp_server.proc is None:
            llama_cpp_server.start()
    accepted = [s["sample_id"] for s in samples if s["accepted"]]
    assert killed.is_set() and len(accepted) >= 2  # at least one partition was left when the server died
    assert sorted(t["sample_id"] for t in targets) == sorted(accepted)  # each once
    assert mlrun.data.metrics["retried_partitions"] >= 1
    assert read_meta(path)["soft_targets"] is True and "echo" in mlrun.data.tags["distill.scored_by"]
    with_targets = [t for t in targets if t["topk_ids"]]
    assert len(with_targets) >= len(targets) - mlrun.data.metrics["sequence_level_samples"] and with_targets
    for t in with_targets:
        assert sum(t["loss_mask"]) == len(t["topk_ids"]) and len(t["topk_ids"][0]) == 20
        completion = [tok for tok, m in zip(t["token_ids"][1:], t["loss_mask"], strict=False) if m]
        assert (np.array(t["topk_ids"])[:, 0] == np.array(completion)).mean() > 0.6
    assert "moeforge.warning" not in mlrun.data.tags


def test_an_unreachable_teacher_fails_distill_saying_so_and_writes_nothing(tmp_path, llama_cpp_server):
    cfg = remote(tmp_path / "w", llama_cpp_server)
    run_pipeline(cfg, [Generate()])
    llama_cpp_server.kill()
    try:
        with pytest.raises(StageFailed, match=r"teacher server http://127\.0\.0\.1:\d+/v1/? did not answer") as err:
            run_pipeline(cfg, [Generate(), Distill()])
    finally:
        llama_cpp_server.start()
    assert err.value.stage == "distill"
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    failed = client.get_run(err.value.run_id)
    assert failed.info.status == "FAILED" and not client.list_artifacts(failed.info.run_id)
    assert not list((tmp_path / "w" / "resume").glob("distill-*/shards/part-*.parquet"))
