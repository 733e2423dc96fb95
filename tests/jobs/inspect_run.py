"""What a run left on a cluster, seen from a driver connected to it (run by tests/jobs/test_cluster.py with the
cluster's environment, token included).

    python -m tests.jobs.inspect_run GCS_ADDRESS DASHBOARD_URL TRACKING_URI '{"name": [uri, hash]}' '{"head": node_id}'

Prints one JSON line: {"actors": [[name, node_id], ...] (the teacher actors, from Ray's state API),
"reads": {node_id: {artifact: number of files read}}} where every artifact was read from a process on each node;
fails if any artifact cannot be fetched or does not match its content hash.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def read_all(tracking_uri: str, outputs: dict[str, list[str]]) -> tuple[str, dict[str, int]]:
    import tempfile
    from pathlib import Path

    from pipeline.artifacts import ArtifactRef, fetch

    counts = {}
    with tempfile.TemporaryDirectory() as workdir:  # a fresh cache: every artifact is downloaded here
        for name, (uri, digest) in outputs.items():
            path = fetch(ArtifactRef(name, uri, digest), tracking_uri, Path(workdir))  # verifies the hash
            counts[name] = sum(1 for p in path.rglob("*") if p.is_file())
    return ray.get_runtime_context().get_node_id(), counts


def main() -> None:
    gcs, dashboard, tracking_uri = sys.argv[1:4]
    outputs, nodes = json.loads(sys.argv[4]), json.loads(sys.argv[5])
    ray.init(address=gcs, log_to_driver=False, namespace="read-artifacts")
    task = ray.remote(read_all)
    refs = [
        task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            tracking_uri, outputs
        )
        for node in nodes.values()
    ]
    reads = dict(ray.get(refs))
    from ray.util.state import list_actors

    teachers = list_actors(address=dashboard, filters=[("class_name", "=", "TeacherWorker")], limit=1000, detail=True)
    actors = [[a.name, a.node_id] for a in teachers]
    print(json.dumps({"actors": actors, "reads": reads}))


if __name__ == "__main__":
    main()
