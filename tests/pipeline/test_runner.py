"""The orchestrator against a real local Ray cluster and a real `mlflow server` on loopback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow import MlflowClient

from pipeline.artifacts import ArtifactError, fetch, read_table
from pipeline.config import load_config
from pipeline.dag import DagError
from pipeline.runner import StageFailed, run_pipeline
from pipeline.tracking import PARENT, P, Tracker
from pipeline.version import code_version
from tests.pipeline.stages_for_tests import (
    SCALED,
    ClusterProbe,
    Numbers,
    Polish,
    ReadsUndeclared,
    Scale,
    SecondProbe,
    SummarizePolished,
    chain,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


@pytest.fixture
def setup(tmp_path, mlflow_server, request):
    """A config on its own experiment of the shared server, and a file counting real stage executions."""
    experiment = request.node.name.replace("[", "-").replace("]", "")
    cfg = load_config(
        "tiny",
        [
            f"tracking.uri={mlflow_server.uri}",
            f"tracking.experiment={experiment}",
            f"tracking.workdir={tmp_path / 'work'}",
            "data.num_train_prompts=10",
        ],
    )
    calls = tmp_path / "calls.txt"
    calls.touch()
    return cfg, calls


def executed(calls: Path) -> list[str]:
    lines = calls.read_text().splitlines()
    calls.write_text("")
    return lines


def test_run_tree_params_tags_and_lineage(setup, mlflow_server):
    cfg, calls = setup
    result = run_pipeline(cfg, chain(str(calls)))
    assert executed(calls) == ["numbers", "scale", "summarize"]

    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[P + "kind"] == "pipeline"
    assert parent.data.tags[P + "config_hash"] == cfg.hash()
    assert parent.data.tags[P + "code_version"] == code_version()
    assert parent.data.params["train.max_steps"] == "24" and parent.data.params["data.num_train_prompts"] == "10"
    assert "config.yaml" in [a.path for a in client.list_artifacts(result.run_id)]

    children = Tracker(cfg.tracking).stage_runs(result.run_id)
    assert [c.info.run_name for c in children] == ["numbers", "scale", "summarize"]
    by_name = {c.info.run_name: c for c in children}
    for child in children:
        assert child.data.tags[PARENT] == result.run_id and child.info.status == "FINISHED"
        assert child.data.tags[P + "cache_hit"] == "false"
        assert child.data.tags[P + "code_version"] == code_version()
    # params are exactly the stage's config slice
    assert set(by_name["scale"].data.params) == {f"distill.{k}" for k in cfg.distill.model_dump()}
    assert by_name["numbers"].data.params["data.num_train_prompts"] == "10"
    # lineage: an input's hash is its producer's output hash
    numbers_out = by_name["numbers"].data.tags[P + "output.numbers.hash"]
    assert by_name["scale"].data.tags[P + "input.numbers.hash"] == numbers_out
    assert by_name["scale"].data.tags[P + "input.numbers.uri"].startswith("mlflow-artifacts:")
    assert by_name["numbers"].data.metrics["rows"] == 10
    # the committed artifact is in the server's store, and readable through it from a fresh cache
    ref = result["scale"].outputs["scaled"]
    table = read_table(fetch(ref, mlflow_server.uri, Path(cfg.tracking.workdir) / "other-node"), SCALED, ref.hash)
    assert table.column("x").to_pylist() == [i * cfg.distill.top_k for i in range(10)]
    assert [a.path for a in client.list_artifacts(by_name["scale"].info.run_id, "outputs")] == ["outputs/scaled"]


def test_identical_rerun_is_all_cache_hits(setup):
    cfg, calls = setup
    first = run_pipeline(cfg, chain(str(calls)))
    executed(calls)
    second = run_pipeline(cfg, chain(str(calls)))
    assert executed(calls) == []
    assert [s.cache_hit for s in second.stages] == [True, True, True]
    assert second["summarize"].outputs == first["summarize"].outputs
    for child in Tracker(cfg.tracking).stage_runs(second.run_id):
        assert child.data.tags[P + "cache_hit"] == "true"
        assert child.data.tags[P + "cached_from"] == first[child.info.run_name].run_id


def test_config_change_reruns_the_stage_and_what_follows_only(setup):
    cfg, calls = setup
    run_pipeline(cfg, chain(str(calls)))
    executed(calls)
    # distill.top_k is read by `scale` only: numbers stays cached; summarize re-runs because its input changed
    changed = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"top_k": 3})})
    result = run_pipeline(changed, chain(str(calls)))
    assert executed(calls) == ["scale", "summarize"]
    assert [s.cache_hit for s in result.stages] == [True, False, False]
    # evaluate is read by the last stage only
    changed2 = changed.model_copy(update={"evaluate": changed.evaluate.model_copy(update={"batch_size": 3})})
    run_pipeline(changed2, chain(str(calls)))
    assert executed(calls) == ["summarize"]
    # a section no stage reads changes nothing
    changed3 = changed2.model_copy(update={"train": changed2.train.model_copy(update={"max_steps": 7})})
    assert all(s.cache_hit for s in run_pipeline(changed3, chain(str(calls))).stages)
    assert executed(calls) == []


def test_failure_commits_nothing_and_rerun_resumes(setup, mlflow_server, tmp_path):
    cfg, calls = setup
    stages = chain(str(calls), fail_after=4, fail_marker=str(tmp_path / "failed-once"))
    with pytest.raises(StageFailed, match="injected failure after 4 rows") as exc:
        run_pipeline(cfg, stages)
    assert executed(calls) == ["numbers", "scale"]
    client = MlflowClient(mlflow_server.uri)
    failed = client.get_run(exc.value.run_id)
    assert failed.info.status == "FAILED" and "injected failure" in failed.data.tags[P + "error"]
    assert not any(t.startswith(P + "output.") for t in failed.data.tags)
    assert client.list_artifacts(exc.value.run_id) == []  # not even the half-written file
    parent_id = failed.data.tags[PARENT]
    assert client.get_run(parent_id).info.status == "FAILED"
    assert not list((Path(cfg.tracking.workdir) / "staging").glob("*/*"))

    result = run_pipeline(cfg, stages)
    assert executed(calls) == ["scale", "summarize"]  # numbers came from the cache
    assert [s.cache_hit for s in result.stages] == [True, False, False]
    scale = client.get_run(result["scale"].run_id)
    assert scale.data.metrics["resumed_at"] == 4 and scale.data.metrics["rows_done"] == 10
    summary_dir = fetch(result["summarize"].outputs["summary"], mlflow_server.uri, Path(cfg.tracking.workdir))
    assert json.loads((summary_dir / "summary.json").read_text())["sum"] == sum(i * 20 for i in range(10))


def test_a_stage_that_is_off_passes_its_input_on_and_the_rest_still_runs(setup, mlflow_server):
    cfg, calls = setup
    c = str(calls)
    stages = [Numbers(c), Scale(c), Polish(c), SummarizePolished(c)]
    off = cfg.model_copy(update={"refine": cfg.refine.model_copy(update={"iterations": 0})})
    result = run_pipeline(off, stages)
    assert executed(calls) == ["numbers", "scale", "summarize"]
    assert [s.name for s in result.stages] == ["numbers", "scale", "summarize"]  # polish: no run, no outputs
    assert [c.info.run_name for c in Tracker(cfg.tracking).stage_runs(result.run_id)] == [
        "numbers",
        "scale",
        "summarize",
    ]
    summary = fetch(result["summarize"].outputs["summary"], mlflow_server.uri, Path(cfg.tracking.workdir))
    k = cfg.distill.top_k
    assert json.loads((summary / "summary.json").read_text())["sum"] == sum(i * k for i in range(10))
    # on, it runs between them and what follows sees its output
    on = cfg.model_copy(update={"refine": cfg.refine.model_copy(update={"iterations": 1})})
    result = run_pipeline(on, stages)
    assert executed(calls) == ["polish", "summarize"]
    summary = fetch(result["summarize"].outputs["summary"], mlflow_server.uri, Path(cfg.tracking.workdir))
    assert json.loads((summary / "summary.json").read_text())["sum"] == sum(i * k + 1 for i in range(10))


def test_corrupted_artifact_in_the_store_is_detected(setup, mlflow_server):
    cfg, calls = setup
    first = run_pipeline(cfg, chain(str(calls)))
    # flip a byte of the file behind the server's proxied URI (mlflow-artifacts:/<path> -> <destination>/<path>)
    ref = first["numbers"].outputs["numbers"]
    parquet = mlflow_server.artifacts / urlparse(ref.uri).path.lstrip("/") / "data.parquet"
    data = bytearray(parquet.read_bytes())
    data[100] ^= 0xFF
    parquet.write_bytes(bytes(data))
    shutil.rmtree(Path(cfg.tracking.workdir) / "cache", ignore_errors=True)
    with pytest.raises(StageFailed) as exc:
        run_pipeline(cfg, chain(str(calls)), force=["scale"])
    assert isinstance(exc.value.cause, ArtifactError)
    assert "artifact 'numbers': file data.parquet is corrupt" in str(exc.value)


def test_from_until_and_force(setup):
    cfg, calls = setup
    with pytest.raises(DagError, match="upstream stage 'numbers' has no finished run"):
        run_pipeline(cfg, chain(str(calls)), from_stage="scale")
    result = run_pipeline(cfg, chain(str(calls)), until="scale")
    assert [s.name for s in result.stages] == ["numbers", "scale"]
    assert executed(calls) == ["numbers", "scale"]
    result = run_pipeline(cfg, chain(str(calls)), from_stage="scale")
    assert executed(calls) == ["scale", "summarize"] and result["numbers"].cache_hit
    # --force re-runs one stage; deterministic output means the next stage stays cached
    result = run_pipeline(cfg, chain(str(calls)), force=["numbers"])
    assert executed(calls) == ["numbers"] and result["scale"].cache_hit


def test_ray_code_inside_a_stage_finds_this_runs_cluster_beside_another_one(setup, mlflow_server):
    """Two runs on one machine: with a second local Ray cluster up, Ray code that connects by itself inside a
    stage's actors (here the state API; in a run, Ray Train's placement-group cleaner) still finds the run's own
    cluster. Without the stage's `RAY_ADDRESS` it failed with "Found multiple active Ray instances"."""
    import tempfile

    import ray

    from tests.conftest import free_port
    from tests.jobs.cluster import TwoNodeCluster, cluster_env, node_ports, stop

    temp = Path(tempfile.mkdtemp(prefix="ray-other-", dir="/tmp"))  # short: Ray's socket paths are length-capped
    port = free_port()
    other = TwoNodeCluster(f"127.0.0.1:{port}", "", {}, cluster_env(temp), temp)
    try:
        other.ray(
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
            *node_ports(),
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        )
        cfg, _ = setup
        result = run_pipeline(cfg, [ClusterProbe()])
    finally:
        stop(other)
        shutil.rmtree(temp, ignore_errors=True)
    seen = json.loads(
        (
            fetch(result["probe"].outputs["cluster"], mlflow_server.uri, Path(cfg.tracking.workdir)) / "nodes.json"
        ).read_text()
    )
    assert seen == sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


def test_every_stage_runs_in_a_fresh_worker_process(setup, mlflow_server):
    """A worker that ran a stage keeps its heap (glibc does not give it back), so the next stage must not inherit
    it: each stage task gets a process of its own, which exits after it."""
    import time

    import psutil

    cfg, _ = setup
    result = run_pipeline(cfg, [ClusterProbe(), SecondProbe()])
    workdir = Path(cfg.tracking.workdir)
    pids = [
        (fetch(result[stage].outputs[name], mlflow_server.uri, workdir) / "pid").read_text()
        for stage, name in (("probe", "cluster"), ("probe2", "cluster2"))
    ]
    assert pids[0] != pids[1]
    deadline = time.monotonic() + 15
    while psutil.pid_exists(int(pids[0])) and time.monotonic() < deadline:  # it exits after its one stage
        time.sleep(0.2)
    assert not psutil.pid_exists(int(pids[0]))


def test_stage_reading_an_undeclared_section_is_refused(setup):
    cfg, _ = setup
    with pytest.raises(StageFailed, match="reads config section 'train' but does not declare it"):
        run_pipeline(cfg, [ReadsUndeclared()])


DRIVER = """
import sys
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from tests.pipeline.stages_for_tests import chain
cfg = load_config("tiny", sys.argv[1:4])
run_pipeline(cfg, chain(sys.argv[4], fail_after=4, fail_marker=sys.argv[5], hang=True))
"""


def test_killed_driver_is_reaped_and_rerun_resumes(tmp_path):
    """kill -9 the driver mid-stage; the same command again reuses finished stages and resumes the stage."""
    import os
    import signal
    import subprocess
    import sys
    import time

    overrides = [f"tracking.workdir={tmp_path / 'work'}", "tracking.experiment=killed", "data.num_train_prompts=10"]
    calls, marker = tmp_path / "calls.txt", tmp_path / "hung"
    calls.touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *overrides, str(calls), str(marker)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "driver exited before reaching the stage"
            assert time.monotonic() < deadline, "driver never reached the stage"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        proc.wait()
    assert executed(calls) == ["numbers", "scale"]

    cfg = load_config("tiny", overrides)
    tracker = Tracker(cfg.tracking)
    dead = tracker.pipeline_runs()[0]
    assert dead.info.status == "RUNNING"
    result = run_pipeline(cfg, chain(str(calls), fail_after=4, fail_marker=str(marker), hang=True))
    assert executed(calls) == ["scale", "summarize"]
    assert [s.cache_hit for s in result.stages] == [True, False, False]
    assert tracker.client.get_run(result["scale"].run_id).data.metrics["resumed_at"] == 4
    assert tracker.client.get_run(dead.info.run_id).info.status == "KILLED"
    assert all(c.info.status != "RUNNING" for c in tracker.stage_runs(dead.info.run_id))
