"""Each role's actors SIGKILLed (as the OOM killer or a lost node would) while starting and while working: the
teacher (generate), the scorer (distill's teacher actors), the student (evaluate) and the trainer (Ray Train
workers). Every item still comes back once; nothing fails the stage. The pool mechanics alone: test_pool.py."""

from __future__ import annotations

import shutil

import pytest

from actors.pool import ActorPool
from pipeline.config import TeacherConfig
from tests.actors.sigkill import KillWhen

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(600)]


def run_with_kills(make_pool, cls: str, name: str, method: str, items: list) -> tuple[dict, ActorPool]:
    """Build the pool while one actor is killed in its constructor, then map `items` while one is killed in
    `method`; returns the results by key and the pool (its replacement count)."""
    at_start = KillWhen(f"{cls}.__init__", actor=name)
    pool = make_pool()
    try:
        assert at_start.join(), f"no {cls} was found starting"
        mid_work = KillWhen(f"{cls}.{method}")
        out = dict(pool.map_unordered(method, items))
        assert mid_work.join(), f"no {cls} was found in {method}"
    finally:
        pool.shutdown()
    return out, pool


@pytest.mark.parametrize("role, method", [("teacher", "generate"), ("scorer", "score")])
def test_teacher_and_scorer_actors_killed_at_start_and_mid_work(role, method):
    from actors.teacher import GenerateRequest, ScoreRequest, teacher_pool

    cfg = TeacherConfig(num_actors=1, num_cpus_per_actor=1, temperature=0.0, max_new_tokens=24, batch_size=2)
    name = f"t-sigkill-{role}"
    if method == "generate":
        items = [
            (i, GenerateRequest([[{"role": "user", "content": f"Count to {i + 3}."}]] * 2, seed=i)) for i in range(4)
        ]
    else:
        items = [
            (i, ScoreRequest([("basic_arithmetic", f"What is {i} + 1?", f"The answer is {i + 1}.")] * 2, 4, 2))
            for i in range(4)
        ]
    out, pool = run_with_kills(
        lambda: teacher_pool(cfg, name, max_in_flight_per_actor=1), "TeacherWorker", name, method, items
    )
    assert sorted(out) == [0, 1, 2, 3] and pool.replacements == 2
    if method == "generate":
        assert all(len(r.generations) == 2 and r.completion_tokens > 0 for r in out.values())
    else:
        assert all(len(r.targets) == 2 and r.tokens > 0 for r in out.values())


def test_student_actors_killed_at_start_and_mid_work(registered_student, tmp_path):
    from actors.student import AnswerRequest, StudentWorker
    from pipeline.artifacts import ArtifactRef, commit
    from pipeline.stages.artifact_specs import STUDENT

    artifact = tmp_path / "student"
    shutil.copytree(registered_student.directory, artifact)
    ref = ArtifactRef("student", str(artifact), commit(artifact, STUDENT))
    name = "t-sigkill-student"
    items = [
        (i, AnswerRequest([f"What is {i} + {j}?" for j in range(4)], max_new_tokens=48, batch_size=2)) for i in range(4)
    ]
    out, pool = run_with_kills(
        lambda: ActorPool(
            StudentWorker,
            (ref, "", str(tmp_path / "work"), 1),
            size=1,
            name=name,
            num_cpus=1,
            max_in_flight_per_actor=1,
        ),
        "StudentWorker",
        name,
        "answer",
        items,
    )
    assert sorted(out) == [0, 1, 2, 3] and pool.replacements == 2
    assert all(len(r.answers) == 4 for r in out.values())


def test_a_trainer_worker_killed_while_starting_restarts_its_group_and_finishes(tmp_path):
    """A Ray Train worker SIGKILLed while the group sets up (its train context, before any step): the group restarts
    from scratch within train.max_failures and trains the planned steps (the kill mid-run: test_trainer.py)."""
    from actors.trainer import fit
    from tests.actors.test_trainer import shards, with_data
    from tests.pipeline.train.test_replica import job

    killer = KillWhen("RayTrainWorker.init_train_context", timeout=120)
    result = fit(
        with_data(job(num_workers=2, max_steps=8, checkpoint_every=4, max_failures=1), shards(tmp_path / "st", 16)),
        "start-kill",
        str(tmp_path / "ckpt"),
    )
    assert killer.join(), "no Ray Train worker was found starting"
    assert result.error is None and result.metrics["step"] == 8
    assert result.metrics["resumed_from_step"] == 0  # nothing was checkpointed before the kill
