"""A submitted job's stages are cached by the code it was submitted with: the working dir uploaded to Ray has no
.git, and an edit to a source file in it must still re-run the stage (it used to fall back to the package version
and serve the old cache). Real local cluster, real job server, real MLflow store."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest

from pipeline import submit as sub
from pipeline.config import load_config
from tests.pipeline.test_version import copy_code

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]

RUN_CHAIN = """
import json, sys
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.tracking import P, Tracker
from tests.pipeline.stages_for_tests import chain

cfg = load_config("tiny", sys.argv[1:])
result = run_pipeline(cfg, chain())
tags = Tracker(cfg.tracking).client.get_run(result.run_id).data.tags
print("RESULT " + json.dumps({"hits": [s.cache_hit for s in result.stages], "code": tags[P + "code_version"]}))
"""


def submit_and_wait(client, working_dir: Path, sets: list[str]) -> dict:
    cfg = load_config("tiny", [f"job.working_dir={working_dir}", "job.excludes=[]"])
    env = sub.runtime_env(cfg)
    # this environment's interpreter (the job's PATH need not lead to it; clean clones run the suite from .venv)
    sid = client.submit_job(entrypoint=shlex.join([sys.executable, "run_chain.py", *sets]), runtime_env=env)
    deadline = time.monotonic() + 240
    while str(client.get_job_status(sid)).split(".")[-1] not in sub.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    logs = client.get_job_logs(sid)
    assert str(client.get_job_status(sid)).endswith("SUCCEEDED"), logs[-4000:]
    assert "using the code's own version" not in logs  # the version sent with the job is that of the code it ran
    out = json.loads(logs.split("RESULT ", 1)[1].splitlines()[0])
    return {**out, "carried": env["env_vars"][sub.CODE_VERSION_ENV]}


def test_editing_a_source_file_in_a_submitted_working_dir_reruns_the_stage(tmp_path):
    import ray
    from ray.job_submission import JobSubmissionClient

    work = copy_code(tmp_path / "work")
    shutil.copytree(REPO / "configs", work / "configs")
    for init in ("tests/__init__.py", "tests/pipeline/__init__.py", "tests/pipeline/stages_for_tests.py"):
        (work / init).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / init, work / init)
    (work / "run_chain.py").write_text(RUN_CHAIN)
    sets = [f"tracking.workdir={tmp_path / 'state'}", "tracking.experiment=code-version", "data.num_train_prompts=6"]
    client = JobSubmissionClient(f"http://{ray._private.worker.get_dashboard_url()}")

    first = submit_and_wait(client, work, sets)
    assert first["hits"] == [False, False, False] and first["code"] == first["carried"]
    again = submit_and_wait(client, work, sets)
    assert again["hits"] == [True, True, True] and again["code"] == first["code"]
    source = work / "pipeline" / "stages" / "shards.py"
    source.write_text(source.read_text() + "\n# a change a stage runs with\n")
    edited = submit_and_wait(client, work, sets)
    assert edited["code"] != first["code"] and edited["code"] == edited["carried"]
    assert edited["hits"] == [False, False, False]  # new code: nothing comes from the old cache
