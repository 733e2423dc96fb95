"""The actor group on a real local Ray cluster: fan-out, backpressure, retries, dead actors replaced."""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray

from actors.pool import ActorPool, PoolError
from tests.actors.sigkill import KillWhen


class Worker:
    """Squares numbers slowly; fails on keys listed in `fail_once` the first time (marker files), always on
    `fail_always`."""

    def __init__(
        self,
        marker_dir: str = "",
        fail_once: tuple = (),
        fail_always: tuple = (),
        broken: bool = False,
        start_seconds: float = 0.0,
        broken_after: str = "",
    ):
        time.sleep(start_seconds)  # loading a model
        if broken or (broken_after and os.path.exists(broken_after)):
            raise RuntimeError("model file not found: /nowhere")
        self.marker_dir, self.fail_once, self.fail_always = marker_dir, fail_once, fail_always

    def work(self, x: int) -> tuple[int, int]:
        time.sleep(0.2)
        if x in self.fail_always:
            raise ValueError(f"cannot do {x}")
        marker = os.path.join(self.marker_dir, str(x))
        if x in self.fail_once and not os.path.exists(marker):
            open(marker, "w").close()
            raise ValueError(f"flaky {x}")
        return x * x, os.getpid()


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def test_every_item_once_with_bounded_in_flight():
    with ActorPool(Worker, size=2, name="t-pool", num_cpus=0, max_in_flight_per_actor=1) as pool:
        out = dict(pool.map_unordered("work", [(i, i) for i in range(10)]))
        assert pool.peak_in_flight == 2
    assert {k: v[0] for k, v in out.items()} == {i: i * i for i in range(10)}
    assert len({pid for _, pid in out.values()}) == 2  # both actors worked


def test_a_flaky_item_is_retried_and_a_failing_one_is_named(tmp_path):
    with ActorPool(Worker, (str(tmp_path), (3,)), size=1, name="t-flaky", num_cpus=0) as pool:
        retried = []
        out = dict(pool.map_unordered("work", [(i, i) for i in range(5)], on_retry=lambda k, e: retried.append(k)))
    assert sorted(out) == list(range(5)) and retried == [3]
    with (
        ActorPool(Worker, (str(tmp_path), (), (2,)), size=1, name="t-failing", num_cpus=0) as pool,
        pytest.raises(PoolError, match=r"item 2 failed 3 times; last error: .*cannot do 2"),
    ):
        list(pool.map_unordered("work", [(i, i) for i in range(4)], max_attempts=3))


def test_a_killed_actor_is_replaced_and_its_items_rerun():
    with ActorPool(Worker, size=2, name="t-kill", num_cpus=0, max_in_flight_per_actor=3) as pool:
        victim = pool.actors[0]
        threading.Timer(0.5, lambda: ray.kill(victim, no_restart=True)).start()
        keys = [k for k, _ in pool.map_unordered("work", [(i, i) for i in range(12)])]
        assert pool.replacements == 1
        assert ray.get(pool.actors[0].__ray_ready__.remote())  # the slot holds a live replacement
    assert sorted(keys) == list(range(12))  # nothing lost, nothing twice


def test_an_actor_that_cannot_start_is_one_clear_error():
    with pytest.raises(PoolError, match=r"an actor failed to start: .*model file not found: /nowhere"):
        ActorPool(Worker, kwargs={"broken": True}, size=2, name="t-broken", num_cpus=0)


def test_an_actor_killed_while_starting_is_replaced_and_the_pool_works():
    """SIGKILL during the constructor (the OOM killer while a model loads): a death, not a constructor error."""
    killer = KillWhen("Worker.__init__", actor="t-start-kill-", timeout=30)
    with ActorPool(Worker, kwargs={"start_seconds": 1.0}, size=2, name="t-start-kill", num_cpus=0) as pool:
        assert killer.join(), "no starting actor was found to kill"
        assert pool.replacements == 1
        keys = [k for k, _ in pool.map_unordered("work", [(i, i) for i in range(6)])]
    assert sorted(keys) == list(range(6))


def test_a_replacement_whose_constructor_raises_fails_fast_with_its_error(tmp_path):
    """An actor killed mid-work is replaced; if the replacement cannot start (the model is gone now), the pool stops
    at once with the constructor's error instead of spending its replacements on the same error."""
    gone = tmp_path / "model-deleted"
    with ActorPool(
        Worker, kwargs={"broken_after": str(gone)}, size=1, name="t-broken-later", num_cpus=0, max_replacements=8
    ) as pool:
        gone.touch()
        killer = KillWhen("Worker.work", timeout=30)
        done = []
        with pytest.raises(PoolError, match=r"replacement actor failed to start: .*model file not found"):
            done.extend(pool.map_unordered("work", [(i, i) for i in range(30)]))
        assert killer.join() and pool.replacements == 1, (killer.killed, pool.replacements, len(done))


def test_actors_the_cluster_cannot_place_fail_within_the_start_timeout_naming_what_they_asked_for():
    """Ray queues an actor it cannot place until resources appear, which on a fixed cluster is never: the pool
    stops waiting after `start_timeout_s` and says what each actor asked for and what the cluster has free."""
    t0 = time.monotonic()
    with pytest.raises(PoolError, match=r"t-huge: 2 of 2 actors not started within 3 s; each asks for 64 CPU, the "
                       r"cluster has free: CPU [\d.]+ of 2"):  # fmt: skip
        ActorPool(Worker, size=2, name="t-huge", num_cpus=64, start_timeout_s=3)
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 20  # none left queued (a kill is asynchronous)
    while [a for a in ray.util.list_named_actors() if a.startswith("t-huge")] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [a for a in ray.util.list_named_actors() if a.startswith("t-huge")]


def test_a_slow_constructor_within_the_start_timeout_starts():
    with ActorPool(
        Worker, kwargs={"start_seconds": 2.0}, size=1, name="t-slow-start", num_cpus=0, start_timeout_s=30
    ) as pool:
        assert dict(pool.map_unordered("work", [(3, 3)]))[3][0] == 9
