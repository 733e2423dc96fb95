"""A real two-node Ray cluster on this machine: `ray start --head`, then a second `ray start --address` with its own
resources and ports, both stopped after (with `ray stop` scoped to their own processes via a private temp dir)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port

RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class TwoNodeCluster:
    gcs: str  # host:port, what `ray start --address` and drivers connect to
    dashboard: str  # http URL of the head's dashboard and job server
    metrics: dict[str, str]  # node name -> its Prometheus endpoint
    env: dict[str, str]  # the environment the nodes run with (the CLI calls use it too)
    temp_dir: Path
    node_ids: dict[str, str] = field(default_factory=dict)  # node name -> Ray node id

    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc


def cluster_env(temp_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is ours
    env["RAY_TMPDIR"] = str(temp_dir)
    # token authentication, as Ray 2.60 enables it by default, with this cluster's own token: every node, CLI call,
    # driver and the moeforge commands get it from the environment
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = uuid.uuid4().hex + uuid.uuid4().hex
    return env


def node_ports() -> list[str]:
    """Free ports for a node's agents and managers: the defaults (e.g. the agent's 52365) may be taken by another
    local cluster, such as the one the rest of the test session uses."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        "--min-worker-port=0",
        "--max-worker-port=0",
    ]


def start(temp_dir: Path) -> TwoNodeCluster:
    gcs_port, dash_port = free_port(), free_port()
    head_metrics, worker_metrics = free_port(), free_port()
    env = cluster_env(temp_dir)
    cluster = TwoNodeCluster(
        f"127.0.0.1:{gcs_port}",
        f"http://127.0.0.1:{dash_port}",
        {"head": f"http://127.0.0.1:{head_metrics}/metrics", "worker": f"http://127.0.0.1:{worker_metrics}/metrics"},
        env,
        temp_dir,
    )
    # metrics every second instead of every ten: the test watches them while a short pipeline runs
    system = json.dumps({"metrics_report_interval_ms": 1000})
    cluster.ray(
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        "--num-cpus=2",
        "--resources",
        json.dumps({"head_node": 1}),
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--metrics-export-port={head_metrics}",
        f"--ray-client-server-port={free_port()}",
        *node_ports(),
        f"--temp-dir={temp_dir}",
        f"--system-config={system}",
        "--disable-usage-stats",
    )
    cluster.ray(
        "start",
        f"--address={cluster.gcs}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--resources",
        json.dumps({"worker_node": 1}),
        f"--metrics-export-port={worker_metrics}",
        *node_ports(),
        "--disable-usage-stats",
    )
    deadline = time.monotonic() + 90
    nodes: list[dict] = []
    while time.monotonic() < deadline:
        listed = cluster.ray(
            "list", "nodes", "--format=json", "--detail", f"--address={cluster.dashboard}", check=False
        )
        if listed.returncode == 0:
            nodes = [n for n in json.loads(listed.stdout) if n["state"] == "ALIVE"]
            if len(nodes) == 2:
                for n in nodes:
                    name = "head" if n["resources_total"].get("head_node") else "worker"
                    cluster.node_ids[name] = n["node_id"]
                return cluster
        time.sleep(2)
    raise TimeoutError(f"the second node did not join: {nodes}")


def stop(cluster: TwoNodeCluster) -> None:
    """Stop this cluster's processes only (`ray stop` would also stop the session's other local cluster)."""
    import psutil

    mine = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_TMPDIR") == str(cluster.temp_dir) or str(cluster.temp_dir) in " ".join(
                proc.cmdline()
            ):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for proc in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
