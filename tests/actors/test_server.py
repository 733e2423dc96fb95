"""The serve role: the OpenAI-compatible app as a real local Ray Serve deployment, spoken to with the official
`openai` client.

What the deployment adds to the app (tests/pipeline/serving/test_app.py covers the API itself): the registry
version resolved and pinned by the builder, the API key file reaching the replica, Serve's bounded queue refusing
overload with 503, and a killed replica replaced (that test runs last). One app for the module: starting Serve
costs ~8 s here.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from pipeline.config import ServeConfig
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "sk-test-moeforge"
MODEL = "test-student"


@pytest.fixture(scope="module")
def app(ray_cluster, registered_student, tmp_path_factory):
    from ray import serve

    from actors.server import APP_NAME, start

    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")
    settings = ServeConfig.model_validate({
        "port": free_port(), "max_ongoing_requests": 16, "max_queued_requests": 16, "max_batch_size": 8,
        "max_tokens_limit": 200, "max_n": 3, "num_cpus": 1, "api_key_file": str(key_file),
        "health_check_period_s": 1, "health_check_timeout_s": 10})
    url = start(settings, f"models:/{MODEL}@champion", registered_student.tracking_uri)
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_the_replica_serves_the_pinned_version_behind_the_key_file(app, client):
    """The builder resolved the alias to a version, and the key in the mounted file reached the replica."""
    (card,) = client.models.list().data
    info = card.model_extra["moeforge"]
    assert (card.id, info["version"], info["alias"]) == (MODEL, "1", "champion")
    wrong = openai.OpenAI(base_url=f"{app}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{app}/healthz", timeout=10).status_code == 200  # Serve's probes and ours need no key


def test_overload_is_refused_with_503_not_queued_without_bound(app):
    """16 ongoing + 16 queued are allowed; 64 at once: the rest are refused at once, and nothing is a 500."""
    async def one(c: httpx.AsyncClient) -> int:
        r = await c.post(f"{app}/v1/completions", json={"model": MODEL, "prompt": "Load", "max_tokens": 120,
                                                        "ignore_eos": True}, headers={"Authorization": f"Bearer {KEY}"})
        return r.status_code

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(one(c) for _ in range(64)))

    codes = asyncio.run(main())
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 10 and codes.count(200) >= 16, codes
    assert httpx.get(f"{app}/healthz", timeout=10).json()["running"] == 0


def test_a_killed_replica_is_replaced_and_requests_succeed_again(app, client):
    import ray
    from ray.util.state import list_actors

    def replicas():
        return [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                if a.class_name.startswith("ServeReplica:moeforge:OpenAIServer")]

    (old,) = replicas()
    ray.kill(ray.get_actor(old.name, namespace=old.ray_namespace), no_restart=True)
    deadline, answered = time.monotonic() + 90, None
    while time.monotonic() < deadline:
        try:
            answered = client.completions.create(model=MODEL, prompt="Back?", max_tokens=4, temperature=0)
            break
        except (openai.APIStatusError, openai.APIConnectionError):
            time.sleep(0.5)
    assert answered is not None and answered.choices[0].text
    (new,) = replicas()
    assert new.actor_id != old.actor_id
