"""The serve role: the OpenAI-compatible app as a real local Ray Serve deployment, spoken to with the official
`openai` client.

What the deployment adds to the app (tests/pipeline/serving/test_app.py covers the API itself): the registry
version resolved and pinned by the builder, the API key file reaching the replica, Serve's bounded queue refusing
overload with 503, and a killed replica replaced (that test runs last). One app for the module: starting Serve
costs ~8 s here.
"""

from __future__ import annotations

import asyncio
import json
import os
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
def app(ray_cluster, registered_student):
    """The app deployed with the key in the deployer's environment only: the cluster was started before it was set,
    so no Ray worker has it, and the replica gets it from the deployer (the key file route is test_app's)."""
    import ray
    from ray import serve

    from actors.server import APP_NAME, start

    settings = ServeConfig.model_validate(
        {
            "port": free_port(),
            "max_ongoing_requests": 16,
            "max_queued_requests": 16,
            "max_batch_size": 8,
            "max_tokens_limit": 200,
            "max_n": 3,
            "max_sequences_per_request": 8,
            "num_cpus": 1,
            "health_check_period_s": 1,
            "health_check_timeout_s": 10,
        }
    )
    os.environ[settings.api_key_env] = KEY
    try:
        url = start(settings, f"models:/{MODEL}@champion", registered_student.tracking_uri)
    finally:
        del os.environ[settings.api_key_env]
    assert ray.get(ray.remote(lambda: os.environ.get("MOEFORGE_API_KEY")).remote()) is None
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_the_replica_serves_the_pinned_version_behind_the_deployers_key(app, client):
    """The builder resolved the alias to a version, and the key set only where `start` ran reached the replica."""
    (card,) = client.models.list().data
    info = card.model_extra["moeforge"]
    assert (card.id, info["version"], info["alias"]) == (MODEL, "1", "champion")
    wrong = openai.OpenAI(base_url=f"{app}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{app}/healthz", timeout=10).status_code == 200  # Serve's probes and ours need no key


def stats(app: str) -> dict:
    return httpx.get(f"{app}/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()


def test_overload_is_refused_with_503_not_queued_without_bound(app):
    """16 ongoing + 16 queued are allowed; 96 at once: some are refused with 503 and at once, and nothing is a 500.

    How many are refused depends on how fast the 96 arrive against how fast batches finish (Serve's queue bound is
    best effort, and a slow machine lets a batch finish while the last requests are still connecting), so the test
    asserts what holds on any machine: refusals happen, they come back without waiting on the work ahead of them,
    and the accepted ones are all answered.
    """

    async def one(c: httpx.AsyncClient) -> tuple[int, float]:
        start = time.perf_counter()
        r = await c.post(
            f"{app}/v1/completions",
            json={"model": MODEL, "prompt": "Load", "max_tokens": 120, "ignore_eos": True},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        return r.status_code, time.perf_counter() - start

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=96)) as c:
            return await asyncio.gather(*(one(c) for _ in range(96)))

    results = asyncio.run(main())
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 16, codes
    served = sorted(s for code, s in results if code == 200)
    refused = [s for code, s in results if code == 503]
    assert max(refused) < served[len(served) // 2], (refused, served)  # refused at once, not after a queue wait
    assert stats(app)["running"] == 0


# ---------------------------------------------------------------------------------------------- abuse, field by field
# Every dimension a client controls, grown past its cap: the count of prompts and n, the body's bytes (with and
# without the key), the count of messages and parts, each string field's length, JSON nesting, each number's range
# and type, token ids. Each must be a 4xx within seconds, never a 500 or a hang, with the replica healthy after.
CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
VOCAB = 49152  # the test student's vocabulary (SmolLM2's tokenizer)
DEEP = 100_000


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


def cmpl(**kw) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **kw}


def message(**kw) -> dict:
    return chat(messages=[{"role": "user", "content": "hi", **kw}])


def raw(body: dict, field: str, text: str) -> bytes:
    """`body` with `field` set to raw JSON text (what json.dumps cannot write: NaN, 100,000 brackets)."""
    return json.dumps({**body, field: "@@"}).replace('"@@"', text).encode()


TOO_BIG = b'{"model": "test-student", "prompt": "' + b"x" * 32_000_000 + b'"}'
GROW = {
    # prompts per request and n
    "5,000 prompts": (CMPL, cmpl(prompt=["p"] * 5_000)),
    "200,000 prompts": (CMPL, cmpl(prompt=["p"] * 200_000)),
    "2,000 prompts x n=4": (CMPL, cmpl(prompt=["p"] * 2_000, n=4)),
    "5,000 token prompts": (CMPL, cmpl(prompt=[[1]] * 5_000)),
    "n=1,000": (CHAT, chat(n=1_000)),
    "n=2**70": (CHAT, chat(n=2**70)),
    # body bytes
    "32 MB body": (CMPL, TOO_BIG),
    "32 MB body without the key": (CMPL, (TOO_BIG, {})),
    "32 MB chunked body": (CMPL, (b"x" * 65_536 for _ in range(500))),
    # message count and parts
    "10,000 messages": (CHAT, chat(messages=[{"role": "user", "content": "a"}] * 10_000)),
    "10,000 content parts": (CHAT, message(content=[{"type": "text", "text": "a"}] * 10_000)),
    # every string's length
    "100,000-char stop": (CHAT, chat(stop="x" * 100_000)),
    "100,000-char stop in a list": (CMPL, cmpl(stop=["x" * 100_000])),
    "5 stops": (CMPL, cmpl(stop=["a", "b", "c", "d", "e"])),
    "100,000-char model": (CHAT, chat(model="m" * 100_000)),
    "100,000-char user": (CHAT, chat(user="u" * 100_000)),
    "100,000-char message name": (CHAT, message(name="n" * 100_000)),
    "100,000-char role": (CHAT, message(role="r" * 100_000)),
    "900,000-char content": (CHAT, message(content="word " * 180_000)),
    "900,000-char text part": (CHAT, message(content=[{"type": "text", "text": "word " * 180_000}])),
    "100,000-char part type": (CHAT, message(content=[{"type": "t" * 100_000, "text": "a"}])),
    "900,000-char prompt": (CMPL, cmpl(prompt="word " * 180_000)),
    "100,000-char suffix": (CMPL, cmpl(suffix="s" * 100_000)),
    # nesting depth
    "prompt nested 100,000 deep": (CMPL, raw(cmpl(), "prompt", "[" * DEEP + "]" * DEEP)),
    "unknown field nested 100,000 deep": (CHAT, raw(chat(), "tools", "[" * DEEP + "]" * DEEP)),
    "objects nested 100,000 deep": (CHAT, raw(chat(), "stream_options", '{"a":' * DEEP + "1" + "}" * DEEP)),
    # every number's range and type
    **{f"max_tokens={v!r}": (CMPL, cmpl(max_tokens=v)) for v in (0, -1, 201, 2**70, "10", 1.5, True, 1e308)},
    "max_completion_tokens=2**70": (CHAT, chat(max_completion_tokens=2**70)),
    **{f"temperature={v!r}": (CHAT, chat(temperature=v)) for v in (-1, 3, 1e308, "hot", None)},
    "temperature=NaN": (CHAT, raw(chat(), "temperature", "NaN")),
    "temperature=Infinity": (CHAT, raw(chat(), "temperature", "Infinity")),
    **{f"top_p={v!r}": (CHAT, chat(top_p=v)) for v in (0, 1.5, -1e308)},
    **{f"n={v!r}": (CMPL, cmpl(n=v)) for v in (0, -1, 4, "2", 2.0)},
    **{f"seed={v!r}": (CMPL, cmpl(seed=v)) for v in (2**70, -(2**63) - 1, 1.5, "1")},
    **{f"{k}={v!r}": (CHAT, chat(**{k: v})) for k in ("presence_penalty", "frequency_penalty") for v in (1e308, 2)},
    "logprobs=2**70": (CMPL, cmpl(logprobs=2**70)),
    "best_of=2**70": (CMPL, cmpl(best_of=2**70)),
    "stream='yes'": (CHAT, chat(stream="yes")),
    "stream=1": (CMPL, cmpl(stream=1)),
    "ignore_eos='true'": (CMPL, cmpl(ignore_eos="true")),
    "echo=1": (CMPL, cmpl(echo=1)),
    # token ids in token prompts
    **{f"token id {v!r}": (CMPL, cmpl(prompt=[v])) for v in (-1, VOCAB, 2**31, 2**70, 1.5, None, True)},
    "token id out of range in a batch": (CMPL, cmpl(prompt=[[1, 2], [VOCAB + 5]])),
    "empty token prompt": (CMPL, cmpl(prompt=[[]])),
    "empty prompt list": (CMPL, cmpl(prompt=[])),
    "100,000 token ids": (CMPL, cmpl(prompt=[7] * 100_000)),
    "60,000 bad token ids": (CMPL, cmpl(prompt=[-1] * 60_000)),
    "8,000 token ids (over the context)": (CMPL, cmpl(prompt=[7] * 8_000)),
}


@pytest.mark.parametrize("what", list(GROW))
def test_every_dimension_a_client_controls_is_capped_with_a_4xx(app, what):
    path, body = GROW[what]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if isinstance(body, tuple):
        body, headers = body[0], {"Content-Type": "application/json"}
    kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
    t0 = time.monotonic()
    r = httpx.post(f"{app}{path}", headers=headers, timeout=30, **kwargs)
    elapsed = time.monotonic() - t0
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert len(r.content) < 4096 and r.json()["error"]["message"], r.text[:500]  # a short OpenAI error body
    assert elapsed < 5, elapsed
    assert httpx.get(f"{app}/healthz", timeout=10).json() == {"status": "ok"}


def test_after_the_abuse_the_replica_still_answers(client):
    """Runs after the grid above: the same replica, nothing stuck in its engine."""
    out = client.completions.create(model=MODEL, prompt="Still", max_tokens=4, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens >= 1


def test_a_killed_replica_is_replaced_and_requests_succeed_again(app, client):
    import ray
    from ray.util.state import list_actors

    def replicas():
        return [
            a
            for a in list_actors(filters=[("state", "=", "ALIVE")])
            if a.class_name.startswith("ServeReplica:moeforge:OpenAIServer")
        ]

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
