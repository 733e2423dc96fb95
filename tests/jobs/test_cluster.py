"""The pipeline as a Ray job on a real two-node cluster, tracked by a real MLflow server: `ray job submit` (the
CLI), where the actors ran, the run tree on the server, artifacts read back from each node, the project's metrics
on Ray's Prometheus endpoints while it runs, `moeforge submit` / `moeforge jobs`, and the pipeline dashboard in a
real headless Chromium.

One tiny pipeline run (with a `serve` stage) serves every test here: it is the expensive part.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import REPO, free_port, headless_chromium, wait_http
from tests.jobs.cluster import RAY, TwoNodeCluster, start, stop

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SMALL = {
    "data.num_train_prompts": 8,
    "data.num_eval_prompts": 2,
    "generate.shard_size": 2,
    "teacher.max_new_tokens": 40,
    "teacher.num_cpus_per_actor": 0.5,
    "train.num_workers": 2,  # DDP across the two nodes
    "train.cpus_per_worker": 1,
    "train.max_steps": 4,
    "train.warmup_steps": 2,
    "train.batch_size": 2,
    "train.checkpoint_every": 2,
    "evaluate.max_new_tokens": 16,
    "evaluate.num_cpus_per_actor": 0.5,
    "evaluate.decode_tokens": 0,  # decode speed has its own test
    # a small student from scratch: the teacher conversion has its own tests; this one is about the cluster
    "model.init": "scratch",
    "model.n_layers": 4,
    "model.n_routed_experts": 8,
    "model.n_activated_experts": 2,
    # one refine iteration: rollout, teacher and learner pools spread over both nodes
    "refine.iterations": 1,
    "refine.prompts_per_iteration": 2,
    "refine.group_size": 2,
    "refine.max_new_tokens": 16,
    "refine.updates_per_iteration": 1,
}
STAGES = ["generate", "distill", "convert", "train", "refine", "evaluate", "register", "serve"]


class Scraper(threading.Thread):
    """Polls every node's Prometheus endpoint while the pipeline runs; keeps the latest value of every project
    series (per node and process) and every value a gauge took."""

    def __init__(self, endpoints: dict[str, str]):
        super().__init__(daemon=True)
        self.endpoints = endpoints
        self.latest: dict[tuple, float] = {}  # (node, series name, labels) -> last value
        self.history: dict[tuple, list[float]] = {}
        self.expert_snapshots: list[dict[tuple, float]] = []  # the expert-load gauges as each scrape saw them
        self.stop_event = threading.Event()

    def scrape_once(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        snapshot = {}
        for node, url in self.endpoints.items():
            try:
                text = httpx.get(url, timeout=5).text
            except httpx.HTTPError:
                continue
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if not s.name.startswith("ray_moeforge_"):
                        continue
                    key = (node, s.name, tuple(sorted(s.labels.items())))
                    self.latest[key] = s.value
                    self.history.setdefault(key, []).append(s.value)
                    if s.name == "ray_moeforge_expert_load":
                        snapshot[key] = s.value
        if snapshot:
            self.expert_snapshots.append(snapshot)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.scrape_once()
            self.stop_event.wait(2)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)
        self.scrape_once()

    def series(self, name: str, **match: str) -> dict[tuple, float]:
        """Last seen values of series `name` whose labels include `match`, keyed by (node, labels)."""
        out = {}
        for (node, series, labels), value in self.latest.items():
            d = dict(labels)
            if series == name and all(d.get(k) == v for k, v in match.items()):
                out[(node, labels)] = value
        return out

    def total(self, name: str, **match: str) -> float:
        return sum(self.series(name, **match).values())


@dataclass
class FinishedRun:
    cluster: TwoNodeCluster
    tracking_uri: str
    experiment: str
    submission_id: str
    submit: subprocess.CompletedProcess
    run_id: str
    serve_url: str
    scraper: Scraper
    served: int  # chat requests answered by the serve stage's app
    workdir: Path
    sets: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def cluster():
    temp = Path(tempfile.mkdtemp(prefix="mfr", dir="/tmp"))  # short: Ray's socket paths live under it
    c = None
    try:
        c = start(temp)
        yield c
    finally:
        if c is not None:
            stop(c)
        else:  # a half-started cluster: stop whatever of it is running
            stop(TwoNodeCluster("", "", {}, {}, temp))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def finished(cluster, mlflow_server, tmp_path_factory) -> FinishedRun:
    """The tiny pipeline submitted with `ray job submit`, then its Serve app asked a few questions."""
    from mlflow import MlflowClient

    tag = uuid.uuid4().hex[:8]
    experiment, model_name = f"cluster-{tag}", f"cluster-student-{tag}"
    workdir = tmp_path_factory.mktemp("cluster-work")
    serve_port = free_port()
    sets = [
        f"tracking.workdir={workdir}",
        f"tracking.experiment={experiment}",
        f"registry.model_name={model_name}",
        *(f"{k}={v}" for k, v in SMALL.items()),
        "serve.enabled=true",
        f"serve.model_uri=models:/{model_name}/1",
        f"serve.port={serve_port}",
        "serve.proxy_location=HeadOnly",
        "serve.num_cpus=0.5",
    ]
    sid = f"test-pipeline-{tag}"
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": mlflow_server.uri, "MOEFORGE_CACHE_DIR": os.environ["MOEFORGE_CACHE_DIR"]},
        "excludes": [".venv", ".moeforge", ".git", "test-artifacts"],
    }
    scraper = Scraper(cluster.metrics)
    scraper.start()
    try:
        for _ in range(30):  # the head's job agent can come up some seconds after the node: Ray says retry
            proc = subprocess.run(
                [
                    RAY,
                    "job",
                    "submit",
                    "--address",
                    cluster.dashboard,
                    "--working-dir",
                    str(REPO),
                    "--submission-id",
                    sid,
                    "--runtime-env-json",
                    json.dumps(runtime_env),
                    "--",
                    "python",
                    "-m",
                    "jobs.pipeline",
                    "--config",
                    "tiny",
                    *(a for s in sets for a in ("--set", s)),
                ],
                env=cluster.env,
                capture_output=True,
                text=True,
                timeout=1200,
            )
            if "No available agent to submit job" not in proc.stderr:
                break
            time.sleep(2)
        assert proc.returncode == 0, f"ray job submit failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
        client = MlflowClient(mlflow_server.uri)
        runs = client.search_runs(
            [client.get_experiment_by_name(experiment).experiment_id],
            filter_string=f"tags.`moeforge.ray_job` = '{sid}'",
        )
        assert len(runs) == 1, [r.info.run_id for r in runs]
        serve_url = f"http://127.0.0.1:{serve_port}"
        served = 0
        for i in range(4):  # a few real requests, so the serving metrics have something to say
            r = httpx.post(
                f"{serve_url}/v1/chat/completions",
                timeout=120,
                json={
                    "model": model_name,
                    "messages": [{"role": "user", "content": f"What is {i} + 2?"}],
                    "max_tokens": 8,
                    "stream": i % 2 == 1,
                },
            )
            assert r.status_code == 200, r.text
            served += 1
        time.sleep(4)  # two report intervals
    finally:
        scraper.stop()
    return FinishedRun(
        cluster,
        mlflow_server.uri,
        experiment,
        sid,
        proc,
        runs[0].info.run_id,
        serve_url,
        scraper,
        served,
        workdir,
        sets,
    )


@pytest.mark.timeout(1500)
def test_ray_job_submit_runs_the_pipeline_over_both_nodes(finished):
    from mlflow import MlflowClient

    c = finished.cluster
    status = c.ray("job", "status", finished.submission_id, "--address", c.dashboard)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    # the job's log is the CLI's: stage lines and tables; warnings and worker logs went to the run's log file
    job_log = finished.submit.stdout
    assert "✓ train" in job_log and "held-out pass@1" in job_log
    for noise in ("UserWarning", "Inferred schema", "Token authentication", "Creating initial MLflow database"):
        assert noise not in job_log, noise
    logs = sorted((finished.workdir / "logs").glob("run-*.log"))
    assert logs and "(" in logs[0].read_text()  # worker lines, each with its source

    # the MLflow server holds the run tree: one parent, a nested run per stage, all finished
    client = MlflowClient(finished.tracking_uri)
    parent = client.get_run(finished.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["moeforge.ray_job"] == finished.submission_id
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{finished.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in children)  # the server's store

    # every committed artifact is readable, and matches its content hash, from a process on each node
    outputs = {
        k[len("moeforge.output.") : -len(".uri")]: (v, r.data.tags[k[: -len(".uri")] + ".hash"])
        for r in children
        for k, v in r.data.tags.items()
        if k.startswith("moeforge.output.") and k.endswith(".uri")
    }
    assert set(outputs) == {
        "samples",
        "eval_prompts",
        "soft_targets",
        "initial_student",
        "trained_student",
        "student",
        "eval_report",
        "registration",
        "exports",
        "endpoint",
    }
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.jobs.inspect_run",
            c.gcs,
            c.dashboard,
            finished.tracking_uri,
            json.dumps(outputs),
            json.dumps(c.node_ids),
        ],
        env={**c.env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stdout[-4000:] + check.stderr[-4000:]
    report = json.loads(check.stdout.strip().splitlines()[-1])

    # the generation actors ran on both nodes (Ray's state API keeps dead actors)
    generation = [node for name, node in report["actors"] if (name or "").startswith("generate-")]
    assert len(generation) == 2 and set(generation) == set(c.node_ids.values())

    assert set(report["reads"]) == set(c.node_ids.values())
    for node, read in report["reads"].items():
        assert set(read) == set(outputs), node
        assert all(files > 0 for files in read.values()), (node, read)


@pytest.mark.timeout(300)
def test_project_metrics_on_rays_prometheus_endpoints(finished):
    from mlflow import MlflowClient

    from pipeline.metrics import exported_names

    s = finished.scraper
    client = MlflowClient(finished.tracking_uri)
    stages = {
        r.info.run_name: r
        for r in client.search_runs(
            [client.get_run(finished.run_id).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{finished.run_id}'",
        )
    }
    gen = stages["generate"].data.metrics
    run = {"run": finished.run_id}

    # generate: what the counters say is what the stage recorded in MLflow
    assert s.total("ray_moeforge_samples_generated_total", **run) == gen["samples"] == SMALL["data.num_train_prompts"]
    assert s.total("ray_moeforge_samples_accepted_total", **run) == gen["accepted"]
    assert s.total("ray_moeforge_prompts_generated_total", **run) == SMALL["data.num_train_prompts"]
    tasks = {dict(labels)["task"] for _, labels in s.series("ray_moeforge_samples_generated_total", **run)}
    assert tasks == {k.split(".", 1)[1] for k in gen if k.startswith("acceptance_rate.")}
    assert s.total("ray_moeforge_generate_tokens_total", **run) > 0
    assert 0 < max(s.series("ray_moeforge_generate_tokens_per_second", **run).values()) < 1e5

    # distill: tokens scored match the soft targets' size order; throughput positive
    assert s.total("ray_moeforge_distill_tokens_total", **run) >= stages["distill"].data.metrics["target_positions"]
    assert max(s.series("ray_moeforge_distill_tokens_per_second", **run).values()) > 0

    # train: seen while the workers lived: steps up to max_steps, losses that the MLflow history also holds
    history = {m.step: m.value for m in client.get_metric_history(stages["train"].info.run_id, "loss")}
    seen_steps = {
        v
        for (node, name, labels), vals in s.history.items()
        if name == "ray_moeforge_train_step" and dict(labels).get("run") == finished.run_id
        for v in vals
    }
    assert seen_steps and seen_steps <= set(range(1, SMALL["train.max_steps"] + 1))
    seen_losses = [
        v
        for (node, name, labels), vals in s.history.items()
        if name == "ray_moeforge_train_loss" and dict(labels).get("run") == finished.run_id
        for v in vals
    ]
    assert seen_losses and all(any(math.isclose(v, h, rel_tol=1e-6) for h in history.values()) for v in seen_losses)
    # expert load: shares in [0, 1]; in a scrape that saw one step's gauges, each MoE layer's 8 experts sum to 1
    assert all(0 <= v <= 1 for v in s.series("ray_moeforge_expert_load", **run).values())
    complete = []
    for snap in s.expert_snapshots:
        by_layer: dict[str, list[float]] = {}
        for (_, _, labels), v in snap.items():
            if dict(labels).get("run") == finished.run_id:
                by_layer.setdefault(dict(labels)["layer"], []).append(v)
        if len(by_layer) == 3 and all(len(v) == 8 for v in by_layer.values()):
            complete.append(by_layer)
    assert complete and any(all(math.isclose(sum(v), 1.0, abs_tol=1e-3) for v in layer.values()) for layer in complete)
    assert s.total("ray_moeforge_train_tokens_total", **run) > 0

    # serve: every answered request counted, latency and TTFT observed for each, TTFT within latency
    ok = s.total("ray_moeforge_serve_requests_total", route="/v1/chat/completions", status="200")
    assert ok >= finished.served
    latency_count = s.total("ray_moeforge_serve_latency_seconds_count", route="/v1/chat/completions")
    ttft_count = s.total("ray_moeforge_serve_ttft_seconds_count", route="/v1/chat/completions")
    assert latency_count >= finished.served and ttft_count >= finished.served
    latency_sum = s.total("ray_moeforge_serve_latency_seconds_sum", route="/v1/chat/completions")
    ttft_sum = s.total("ray_moeforge_serve_ttft_seconds_sum", route="/v1/chat/completions")
    assert 0 < ttft_sum < 120 * ttft_count and 0 < latency_sum < 120 * latency_count
    assert s.series("ray_moeforge_serve_queue_depth") and all(
        v >= 0 for v in s.series("ray_moeforge_serve_queue_depth").values()
    )

    # every series the code declares showed up (so the Grafana dashboard, which uses only these, has data)
    seen = {name for (_, name, _) in s.latest}
    assert exported_names() <= seen, sorted(exported_names() - seen)


@pytest.mark.timeout(600)
def test_moeforge_submit_follows_a_stage_job_and_lists_it(finished):
    c = finished.cluster
    # secrets planted in job.env_vars and in the tracking URL (the server ignores the credentials) must not show
    secret, password = "sk-planted-in-the-job", "planted-tracking-password"
    server = urlparse(finished.tracking_uri)
    with_credentials = f"{server.scheme}://moeforge:{password}@{server.netloc}"
    env = {**c.env, "MLFLOW_TRACKING_URI": with_credentials, "RAY_ADDRESS": c.dashboard, "COLUMNS": "250"}
    moeforge = str(Path(sys.executable).parent / "moeforge")
    sets = [a for s in [*finished.sets, f"job.env_vars={{HF_TOKEN: {secret}}}"] for a in ("--set", s)]
    # stage `evaluate` alone: its upstream is cached from the pipeline job, and so is evaluate itself
    proc = subprocess.run(
        [moeforge, "submit", "evaluate", "--config", "tiny", *sets],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    sid = out.split("submitted job ", 1)[1].split()[0]
    assert "evaluate" in out and "cached" in out  # the job's own log, followed
    assert f"{finished.tracking_uri}/#/experiments/" in out and "SUCCEEDED" in out
    listed = subprocess.run(
        [moeforge, "jobs", "--address", c.dashboard], env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0 and sid[:20] in listed.stdout and finished.submission_id[:20] in listed.stdout
    for text in (out, listed.stdout + listed.stderr):
        assert secret not in text and password not in text
    # a stage alone with no cached upstream fails, says why, and the submit exits non-zero
    bad = subprocess.run(
        [moeforge, "submit", "train", "--config", "tiny", *sets, "--set", "distill.top_k=10"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "no finished run" in bad.stdout + bad.stderr
    # bad input to submit itself: an unknown job, a config file the job could not read
    unknown = subprocess.run(
        [moeforge, "submit", "nonsense"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert unknown.returncode == 2 and "unknown job 'nonsense'" in unknown.stderr


@pytest.mark.timeout(300)
def test_submit_and_jobs_without_the_clusters_token_say_in_one_line_what_to_set(cluster, tmp_path):
    """The cluster runs with token authentication (as `ray start --head` does in Ray 2.60); a client with neither
    RAY_AUTH_MODE nor a token gets one line naming RAY_AUTH_MODE=token and where the token lives, no traceback."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), COLUMNS="400")  # no ~/.ray/auth_token either
    moeforge = str(Path(sys.executable).parent / "moeforge")
    for args in (["submit", "evaluate", "--no-wait"], ["jobs"]):
        proc = subprocess.run(
            [moeforge, *args, "--address", cluster.dashboard],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "RAY_AUTH_MODE=token" in lines[0] and "~/.ray/auth_token" in lines[0], lines[0]


@pytest.mark.timeout(300)
def test_dashboard_in_a_browser_shows_the_finished_run(finished, tmp_path):
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    env = {**finished.cluster.env, "MLFLOW_TRACKING_URI": finished.tracking_uri}
    log = open(tmp_path / "dashboard.log", "w")  # noqa: SIM115 - the server's output while it runs; closed below
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "moeforge"),
            "dashboard",
            "--set",
            f"tracking.experiment={finished.experiment}",
            "--port",
            str(port),
            "--ray-dashboard",
            finished.cluster.dashboard,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    browser = None
    try:
        wait_http(f"http://127.0.0.1:{port}/api/runs", timeout=60, proc=server)
        browser = headless_chromium()
        browser.get(f"http://127.0.0.1:{port}/?run={finished.run_id}")
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == finished.run_id, (
            browser.find_element(By.ID, "error").text
        )

        client = MlflowClient(finished.tracking_uri)
        children = {
            r.info.run_name: r
            for r in client.search_runs(
                [client.get_run(finished.run_id).info.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{finished.run_id}'",
            )
        }
        # the stages: DAG nodes and table rows, each finished
        nodes = browser.find_elements(By.CSS_SELECTOR, "#dag g.dag-node")
        assert [n.get_attribute("data-stage") for n in nodes] == STAGES
        assert {n.get_attribute("data-state") for n in nodes} == {"finished"}
        for name in STAGES:
            row = browser.find_element(By.CSS_SELECTOR, f'#stage-table tr[data-stage="{name}"]')
            assert row.find_element(By.CSS_SELECTOR, ".stage-state").text == "finished"
        # the loss curve: one point per logged step, the last loss as MLflow has it
        history = sorted(client.get_metric_history(children["train"].info.run_id, "loss"), key=lambda m: m.step)
        line = browser.find_element(By.ID, "loss-line-loss")
        assert int(line.get_attribute("data-points")) == len(history) == SMALL["train.max_steps"]
        assert len(line.get_attribute("points").split()) == len(history)
        last = browser.find_element(By.ID, "loss-last").text
        assert last == f"loss {history[-1].value:.4g} at step {history[-1].step}" or float(
            last.split()[1]
        ) == pytest.approx(history[-1].value, rel=1e-3)
        # the evaluation table: teacher and student pass@1 per task and overall, the evaluate run's numbers
        ev = children["evaluate"].data.metrics
        rows = browser.find_elements(By.CSS_SELECTOR, "#eval-table tbody tr")
        tasks = sorted(k.split("teacher.pass_at_1.", 1)[1] for k in ev if k.startswith("teacher.pass_at_1."))
        assert [r.get_attribute("data-task") for r in rows] == [*tasks, "overall"]
        for r in rows:
            task = r.get_attribute("data-task")
            key = "pass_at_1" if task == "overall" else f"pass_at_1.{task}"
            assert r.find_element(By.CSS_SELECTOR, ".teacher").text == f"{ev['teacher.' + key]:.3f}"
            assert r.find_element(By.CSS_SELECTOR, ".student").text == f"{ev['student.' + key]:.3f}"
        # the expert-load heatmap and the serving latency from Ray's endpoints
        cells = browser.find_elements(By.CSS_SELECTOR, "#expert-heatmap rect[data-layer]")
        assert len(cells) == 3 * 8  # tiny: 3 MoE layers x 8 routed experts
        serving = browser.find_element(By.CSS_SELECTOR, '#serving-table tr[data-route="/v1/chat/completions"]')
        assert int(float(serving.find_elements(By.TAG_NAME, "td")[1].text)) >= finished.served
        assert browser.find_element(By.ID, "ray-link").get_attribute("href").startswith(finished.cluster.dashboard)
        assert browser.find_element(By.ID, "mlflow-link").get_attribute("href").startswith(finished.tracking_uri)
        shots = Path(os.environ.get("MOEFORGE_TEST_ARTIFACTS", REPO / "test-artifacts"))
        shots.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shots / "dashboard.png"))
        assert (shots / "dashboard.png").stat().st_size > 10_000
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=20)
        log.close()
