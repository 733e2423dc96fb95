"""Submitting moeforge to a Ray cluster as a Ray job (`moeforge submit`, `moeforge jobs`).

A thin layer over Ray's `JobSubmissionClient`: the entrypoint is one of `jobs/` (`python -m jobs.<name>`), the
runtime environment comes from the config's `job` section, and the MLflow run a job started is found by the tag
`moeforge.ray_job` that the driver sets from its submission id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.config import JobConfig, MoeforgeConfig, resolve_preset
from pipeline.redaction import redact_url, secret_name
from pipeline.tracking import resolve_tracking_uri
from pipeline.version import ENV as CODE_VERSION_ENV
from pipeline.version import has_code, version_of

log = logging.getLogger(__name__)

# `python -m jobs.<name>`: the whole pipeline, each stage in DAG order, serving (tests check this is jobs/)
JOB_NAMES = ("pipeline", "generate", "distill", "convert", "train", "refine", "evaluate", "register", "serve")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60.0  # how long a submission waits for a just-started head's job agent


class SubmitError(RuntimeError):
    """The job cannot be submitted as asked (unknown job, config outside the working dir, unreachable cluster)."""


def job_address(cfg: JobConfig) -> str:
    """The job server: `job.address`, else $RAY_ADDRESS when it is an http(s) URL, else the local head's."""
    if cfg.address:
        return cfg.address
    env = os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def config_argument(config: str, working_dir: Path) -> str:
    """How the job names the config: a preset name as is, a file by its path inside the uploaded working dir."""
    path = Path(config)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        return config  # a preset: resolved in the job's working dir (its configs/) like here
    resolved = resolve_preset(config).resolve()
    try:
        return resolved.relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise SubmitError(
            f"config file {config} is outside the job's working dir {working_dir}: the job could not "
            "read it; move it under the working dir or set job.working_dir"
        ) from None


def entrypoint(job: str, config: str, overrides: list[str], extra: list[str]) -> str:
    if job not in JOB_NAMES:
        raise SubmitError(f"unknown job {job!r}; jobs: {', '.join(JOB_NAMES)}")
    # `job.*` describes the submission itself (env vars, pip, working dir) and reaches the job as its runtime env;
    # it is left off the command line, which Ray shows to anyone listing jobs (env var values may be secrets)
    sets = [a for o in overrides if not o.strip().startswith("job.") for a in ("--set", o)]
    for o in overrides:
        key, _, value = (part.strip() for part in o.partition("="))
        if not key.startswith("job.") and (redact_url(value) != value or (value and secret_name(key.split(".")[-1]))):
            raise SubmitError(
                f"--set {key}=...: the value holds a credential, and the job's command line is shown to "
                "anyone who lists jobs; give it to the job through its environment instead (e.g. "
                "MLFLOW_TRACKING_URI / MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD set where "
                "the cluster runs)"
            )
    return shlex.join(["python", "-m", f"jobs.{job}", "--config", config, *sets, *extra])


def runtime_env(cfg: MoeforgeConfig) -> dict[str, Any]:
    """Ray's runtime environment of the job: working dir, excludes, pip, env vars (set and forwarded)."""
    j = cfg.job
    env = {name: os.environ[name] for name in j.forward_env if os.environ.get(name)}
    env.update(j.env_vars)
    if cfg.tracking.uri:
        env.setdefault("MLFLOW_TRACKING_URI", cfg.tracking.uri)
    working_dir = Path(j.working_dir).resolve()
    if has_code(working_dir):  # the version of the code uploaded (no .git goes with it), checked by the job
        env[CODE_VERSION_ENV] = version_of(working_dir)
    out: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(j.excludes)}
    if j.pip:
        out["pip"] = list(j.pip)
    if env:
        out["env_vars"] = env
    return out


def new_submission_id(job: str) -> str:
    return f"moeforge-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    with token_refusal(address):
        try:
            return JobSubmissionClient(address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SubmitError(
                f"cannot reach the Ray job server at {address}: {e} (start a cluster with `ray start "
                "--head`, or set RAY_ADDRESS / job.address to its dashboard URL)"
            ) from None


@contextlib.contextmanager
def token_refusal(address: str) -> Iterator[None]:
    """A cluster with token authentication that this client gave no (or the wrong) token: one line saying what to
    set, instead of Ray's traceback."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        raise SubmitError(
            f"the Ray cluster at {address} requires token authentication and refused this client (RAY_AUTH_MODE is "
            f"{mode}): set RAY_AUTH_MODE=token and give the cluster's token as RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
            "or the file ~/.ray/auth_token (`ray start --head` keeps it there on the head node)"
        ) from None


def submit(
    cfg: MoeforgeConfig, job: str, config: str, overrides: list[str], extra: list[str], submission_id: str | None = None
) -> tuple[Any, str]:
    """Submit `python -m jobs.<job>`; returns (client, submission id)."""
    working_dir = Path(cfg.job.working_dir)
    if not working_dir.is_dir():
        raise SubmitError(f"job.working_dir {working_dir} is not a directory")
    command = entrypoint(job, config_argument(config, working_dir), overrides, extra)
    jobs = client(job_address(cfg.job))
    sid = submission_id or new_submission_id(job)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            with token_refusal(job_address(cfg.job)):
                jobs.submit_job(
                    entrypoint=command,
                    runtime_env=runtime_env(cfg),
                    submission_id=sid,
                    metadata={"moeforge.job": job, "moeforge.config": cfg.name, "moeforge.config_hash": cfg.hash()},
                    entrypoint_num_cpus=cfg.job.entrypoint_num_cpus or None,
                    entrypoint_num_gpus=cfg.job.entrypoint_num_gpus or None,
                )
            return jobs, sid
        except SubmitError:
            raise
        except RuntimeError as e:
            # a head that just started has no job agent for a few seconds; Ray's answer is "try again later"
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise SubmitError(f"the Ray job server at {job_address(cfg.job)} refused the job: {e}") from None
            log.info("job server has no job agent yet; retrying the submission of %s", sid)
            time.sleep(2)


def follow(jobs, submission_id: str, write: Callable[[str], None]) -> str:
    """Stream the job's logs until it ends; returns its final status."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(submission_id):
            write(chunk)

    asyncio.run(tail())
    status = str(jobs.get_job_status(submission_id))
    while status.split(".")[-1] not in TERMINAL:  # the log stream can close a moment before the status is final
        time.sleep(0.5)
        status = str(jobs.get_job_status(submission_id))
    return status.split(".")[-1]


def tracking_uri_of_job(cfg: MoeforgeConfig) -> str:
    """Where the job tracks: what its environment says, else what this config resolves to here."""
    return runtime_env(cfg).get("env_vars", {}).get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(cfg.tracking)


def recent(jobs, limit: int, address: str = DEFAULT_ADDRESS) -> list:
    """The most recent jobs first."""
    with token_refusal(address):
        details = jobs.list_jobs()
    details.sort(key=lambda d: d.start_time or 0, reverse=True)
    return details[:limit]
