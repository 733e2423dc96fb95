"""What `moeforge run` shows and what goes to its log file, with a real local Ray cluster and real workers."""

from __future__ import annotations

import logging
import time
import uuid
import warnings

import pytest

from pipeline.run_log import RunLog


def _noisy_task(token: str):
    import sys
    import warnings

    from ray.experimental.tqdm_ray import tqdm

    print("worker-print-noise", flush=True)
    # a new text each call: a worker process shows a given warning once, and tests share the session's workers
    warnings.warn(f"worker-warning-noise {token}", UserWarning, stacklevel=1)
    sys.stderr.flush()
    bar = tqdm(total=2, desc="stage-progress-bar")
    bar.update(2)
    bar.close()
    return 1


def _wait_for(path, text: str, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.2)
    return path.read_text()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("verbose", [False, True])
def test_worker_output_and_warnings_go_to_the_file_and_progress_bars_stay(tmp_path, capfd, verbose):
    import ray

    run_log = RunLog(tmp_path, verbose=verbose)
    run_log.install()
    try:
        assert run_log.route_worker_logs()
        warnings.warn(f"driver-warning-noise {uuid.uuid4().hex}", UserWarning, stacklevel=1)
        logging.getLogger("mlflow.store").warning("library-log-noise")
        assert ray.get(ray.remote(_noisy_task).remote(uuid.uuid4().hex)) == 1
        content = _wait_for(run_log.path, "worker-warning-noise")
        time.sleep(1.0)  # the bar's updates travel the same stream; let them arrive
    finally:
        run_log.uninstall()
    shown = capfd.readouterr()
    terminal = shown.out + shown.err
    assert run_log.path.parent == tmp_path / "logs"
    for noise in ("worker-print-noise", "worker-warning-noise", "driver-warning-noise", "library-log-noise"):
        assert noise in content, f"{noise} missing from the log file"
        assert (noise in terminal) == verbose, f"{noise} on the terminal: {terminal!r}"
    assert "stage-progress-bar" in terminal  # progress bars always reach the terminal
    assert "stage-progress-bar" not in content


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_uninstall_gives_ray_its_printing_back(tmp_path, capfd):
    import ray

    filters, handlers = list(warnings.filters), list(logging.getLogger().handlers)
    run_log = RunLog(tmp_path)
    run_log.install()
    run_log.route_worker_logs()
    run_log.uninstall()
    assert warnings.filters == filters and logging.getLogger().handlers == handlers
    ray.get(ray.remote(_noisy_task).remote(uuid.uuid4().hex))
    deadline = time.monotonic() + 30
    seen = ""
    while time.monotonic() < deadline and "worker-print-noise" not in seen:
        time.sleep(0.2)
        shown = capfd.readouterr()
        seen += shown.out + shown.err
    assert "worker-print-noise" in seen
    assert "worker-print-noise" not in run_log.path.read_text()


def _print_task(token: str) -> None:
    print(f"last-words {token}", flush=True)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_line_printed_just_before_the_end_still_reaches_the_file(tmp_path, capfd):
    import ray

    token = uuid.uuid4().hex
    run_log = RunLog(tmp_path)
    run_log.install()
    run_log.route_worker_logs()
    try:
        ray.get(ray.remote(_print_task).remote(token))  # Ray relays the line a moment after the task returns
    finally:
        run_log.drain()
        run_log.uninstall()
    time.sleep(2)  # anything still in flight would now be printed by Ray's restored printer
    shown = capfd.readouterr()
    assert token in run_log.path.read_text()
    assert token not in shown.out + shown.err


def test_a_closed_progress_bar_is_not_drawn_again():
    """The states of a bar that reach the driver again after it closed (Ray Train's workers sent a whole closed
    bar twice, drawn as a second line) are dropped; other bars, and a bar's own closing state, pass."""
    import json

    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    from pipeline.run_log import ClosedBars

    def state(bar: str, x: int, closed: bool = False) -> str:
        return json.dumps({"__magic_token__": RAY_TQDM_MAGIC, "uuid": bar, "x": x, "closed": closed})

    bars = ClosedBars()
    stream = [state("a", 0), state("a", 5), state("b", 0), state("a", 24, closed=True)]
    assert [bars.keep(s) for s in stream] == [True, True, True, True]
    assert [bars.keep(s) for s in stream] == [False, False, True, False]  # "a" again: dropped; "b" still open
    assert bars.keep(f"garbled {RAY_TQDM_MAGIC}")
