"""Stage `refine` for real, on Ray: a student converted from the real teacher samples its own answers, the
verifiers grade them, the teacher scores them after its worked examples, the learner updates on Ray Train and the
weights go back to the rollout actors; evaluate and register then judge the refined student. With a rollout
actor, a teacher actor and a learner worker SIGKILLed mid-iteration the stage still finishes its planned
iterations, every iteration counted once, and ends with the weights of the uninterrupted run."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from transformers import AutoTokenizer

from pipeline.config import load_config
from pipeline.data.prompts import chat_token_ids, teacher_messages
from pipeline.data.sources import load_prompts
from pipeline.runner import run_pipeline
from pipeline.stages.results import RefineIteration, RefineReport, Registration, read_result
from pipeline.train.rollouts import iteration_prompts
from tests.actors.sigkill import KillWhen
from tests.pipeline.stages.conftest import TEACHER_SAMPLES

ITERATIONS = 2
OVERRIDES = [
    *TEACHER_SAMPLES,  # generate and distill come from the `upstream` fixture (conftest.py)
    "model.n_layers=6",  # the real teacher converted, 6 of its 30 layers: small, and the same as test_convert's
    "model.kv_lora_rank=64",
    "convert.layout=exact",  # moeforge's own layout, which refine and evaluate run as well (and register won't export)
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.batch_size=2",
    "train.seq_len=128",
    f"refine.iterations={ITERATIONS}",
    "refine.objective=both",
    "refine.prompts_per_iteration=3",
    "refine.group_size=2",
    "refine.max_new_tokens=16",
    "refine.updates_per_iteration=1",
    "refine.lr=1e-4",
    "refine.kl_coef=0.02",  # with the starting student as the KL term's reference (off by default)
    "evaluate.max_new_tokens=16",
    "evaluate.partition_size=2",
    "evaluate.decode_tokens=0",
    "registry.model_name=test-refined",
]


def path_of(ref) -> Path:
    return Path(ref.uri.removeprefix("file://"))


@pytest.fixture(scope="module")
def refined(upstream, tmp_path_factory):
    # checkpoints (train's and the learner's) outside the shared workdir, where test_train.py looks for its own
    storage = tmp_path_factory.mktemp("refine-checkpoints")
    cfg = load_config("tiny", [f"tracking.workdir={upstream}", f"train.storage_path={storage}", *OVERRIDES])
    return cfg, run_pipeline(cfg, until="register")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.timeout(900)
def test_two_iterations_refine_the_student_that_evaluate_and_register_then_judge(refined):
    cfg, result = refined
    assert [s.name for s in result.stages][-4:] == ["train", "refine", "evaluate", "register"]
    client = MlflowClient(result.tracking_uri)
    run = result["refine"].run_id
    for name in RefineIteration.model_fields:
        assert [m.step for m in client.get_metric_history(run, name)] == list(range(ITERATIONS)), name
    tasks = {k for k in client.get_run(run).data.metrics if k.startswith("reward.")}
    assert tasks and tasks <= {f"reward.{t.name}" for t in cfg.data.tasks}  # accuracy per task
    histories = {n: client.get_metric_history(run, n) for n in RefineIteration.model_fields}
    figures = [RefineIteration.model_validate({n: h[i].value for n, h in histories.items()}) for i in range(ITERATIONS)]
    for f in figures:
        assert 0 <= f.reward <= 1 and f.reverse_kl > 0 and 0 < f.routing_agreement <= 1 and f.entropy > 0
        assert f.rollout_tokens > 0 and f.teacher_token_logprob < 0 and f.kl_to_start >= 0
    # the teacher scored every completion after its worked examples: exactly those contexts plus the completions
    tokenizer = AutoTokenizer.from_pretrained(str(path_of(result["train"].outputs["trained_student"])))
    prompts = load_prompts(cfg.data)["train"]
    for i, f in enumerate(figures):
        chosen = [prompts[j] for j in iteration_prompts(len(prompts), 3, i, cfg.refine.seed)]
        contexts = sum(len(chat_token_ids(tokenizer, teacher_messages(p.task, p.question))) for p in chosen) * 2
        assert f.teacher_scored_tokens == contexts + f.rollout_tokens
    # the refined student is what came out, with what it cost
    out = path_of(result["refine"].outputs["student"])
    report = read_result(out, RefineReport)
    assert report.iterations == ITERATIONS and report.objective == "both" and report.router == "frozen"
    assert report.rollout_tokens == sum(f.rollout_tokens for f in figures) and report.minutes > 0
    trained = load_file(path_of(result["train"].outputs["trained_student"]) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(trained[k], after[k]) for k in trained)  # the update reached the weights
    gates = [k for k in trained if k.endswith("gate.weight") or k.endswith("gate.bias")]
    assert gates and all(torch.equal(trained[k], after[k]) for k in gates)  # the router stayed frozen
    # evaluate judged it and register registered the version refine logged
    assert result["evaluate"].outputs and result["register"].outputs
    registration = read_result(path_of(result["register"].outputs["registration"]), Registration)
    version = client.get_model_version_by_alias("test-refined", registration.alias)
    assert version.run_id == run
    # a student converted in the exact layout is registered, not exported: the reason names the knob
    skipped = registration.exports.skipped
    assert skipped and "convert.layout: standard" in skipped and version.tags["moeforge.exports"] == skipped
    assert registration.exports.hf is None and registration.exports.gguf is None
    exports = path_of(result["register"].outputs["exports"])
    assert (exports / "exports.json").is_file() and not (exports / "hf").exists() and not (exports / "gguf").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.timeout(900)
def test_killed_rollout_teacher_and_learner_processes_do_not_change_what_refine_learns(refined):
    cfg, reference = refined
    upstream = cfg.tracking.workdir
    client = MlflowClient(reference.tracking_uri)
    kills = [KillWhen("StudentWorker.rollout", timeout=400), KillWhen("TeacherWorker.score_tokens", timeout=400)]
    learner_killed: list[int] = []

    def kill_a_learner_worker_in_the_second_iteration() -> None:
        import os
        import signal

        import ray

        from tests.actors.test_trainer import worker_pids

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            # the stage's learner channel (actors/learner.py) says when its workers are inside an update
            named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(".learner")]
            if named:
                try:
                    status = ray.get(ray.get_actor(named[0]["name"], named[0]["namespace"]).status.remote())
                except (ValueError, ray.exceptions.RayActorError):  # the stage is stopping it
                    status = {"iteration": None, "updating": []}
                if status["iteration"] == 1 and status["updating"] and (pids := worker_pids()):
                    os.kill(pids[-1], signal.SIGKILL)
                    learner_killed.append(pids[-1])
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_a_learner_worker_in_the_second_iteration, daemon=True)
    watcher.start()
    storage = cfg.train.storage_path
    overrides = [f"tracking.workdir={upstream}", f"train.storage_path={storage}", *OVERRIDES]
    result = run_pipeline(load_config("tiny", overrides), until="refine", force=["refine"])
    watcher.join(5)
    assert all(k.join() for k in kills) and learner_killed, "a process to kill was not found"
    run = result["refine"].run_id
    assert run != reference["refine"].run_id
    for name in ("reward", "reverse_kl", "rollout_tokens"):  # every iteration once, none twice
        assert [m.step for m in client.get_metric_history(run, name)] == list(range(ITERATIONS)), name
    ours = load_file(path_of(result["refine"].outputs["student"]) / "model.safetensors")
    theirs = load_file(path_of(reference["refine"].outputs["student"]) / "model.safetensors")
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)


def test_iteration_prompts_use_every_prompt_once_per_epoch_and_repeat_on_a_redo():
    n, per = 10, 4
    drawn = [j for i in range(5) for j in iteration_prompts(n, per, i, seed=7)]  # 20 draws: two epochs
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:]  # each epoch its own order
    assert iteration_prompts(n, per, 3, seed=7) == drawn[12:16]  # an iteration redone draws the same prompts


def test_a_kept_iteration_is_whole_or_absent_and_only_the_newest_keeps_its_state(tmp_path):
    from pipeline.train.iteration_store import IterationStore

    kept = IterationStore(tmp_path / "it")
    kept.save(0, {"model": {"w": torch.ones(2)}, "optimizer": None}, {"reward": 0.25})
    kept.save(1, {"model": {"w": torch.zeros(2)}, "optimizer": None}, {"reward": 0.5})
    (tmp_path / "it" / ".iter_0002.partial").mkdir()  # a save cut short: not an iteration
    assert kept.done() == [0, 1] and kept.metrics(0) == {"reward": 0.25}
    assert torch.equal(kept.state(1)["model"]["w"], torch.zeros(2))
    assert not (tmp_path / "it" / "iter_0000" / "state.pt").exists()


def test_a_batch_too_small_for_the_learner_is_refused_before_anything_starts():
    from pipeline.config import RefineConfig
    from pipeline.stages.refine import check_batch

    with pytest.raises(ValueError, match=r"4 samples per iteration .* cannot feed 2 learner workers x 3"):
        check_batch(RefineConfig(prompts_per_iteration=2, group_size=2, num_workers=2, updates_per_iteration=3))
