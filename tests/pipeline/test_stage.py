"""A stage's context: its resume space belongs to one run at a time."""

from __future__ import annotations

import threading

from pipeline.config import MoeforgeConfig
from pipeline.stage import StageCall, StageContext
from tests.pipeline.stages_for_tests import chain


def test_two_runs_of_one_stage_with_the_same_key_take_turns_on_its_resume_space(tmp_path):
    """Two drivers on one workdir running the same stage and key: the second waits until the first is done (and
    has deleted its resume space), instead of sharing the folder and losing it halfway."""
    numbers = chain()[0]
    call = StageCall(numbers, MoeforgeConfig(), "run", f"sqlite:///{tmp_path / 'm.db'}", {}, str(tmp_path), "k" * 64)
    first = StageContext(call)
    (first.resume_dir / "progress.jsonl").write_text("first's partial work\n")
    second: list[StageContext] = []
    waiter = threading.Thread(target=lambda: second.append(StageContext(call)))
    waiter.start()
    waiter.join(timeout=2)
    assert waiter.is_alive() and not second  # waiting for the first run
    first.cleanup(succeeded=True)
    waiter.join(timeout=10)
    assert second, "the second run never got the resume space"
    (ctx,) = second
    assert ctx.resume_dir.is_dir() and list(ctx.resume_dir.iterdir()) == []  # a clean start, and still there
    (ctx.resume_dir / "progress.jsonl").write_text("second's\n")
    ctx.cleanup(succeeded=False)  # a failed attempt keeps its partial work for the next one
    again = StageContext(call)  # and the lock is free again
    assert (again.resume_dir / "progress.jsonl").read_text() == "second's\n"
    again.cleanup(succeeded=True)
