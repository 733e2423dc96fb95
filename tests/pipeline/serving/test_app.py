"""The OpenAI-compatible app of one replica (`pipeline/serving/app.py` around a `ModelServer`), served by uvicorn on
loopback without Ray and spoken to with the official `openai` client and raw HTTP.

One app per engine (`serve.engine`: moeforge's own, and llama.cpp on the student's F32 GGUF export), every test
run against each: the registered test student from `models:/test-student@champion`, an API key from a
mounted-secret-style file, small limits so bad inputs are reachable. Expected texts come from the model code itself
(`generate` on the same weights), so the server must reproduce them token for token, alone or under concurrency,
whichever engine runs them.
The same app inside a Ray Serve deployment (placement, queueing, replica replacement) is tested in
tests/actors/test_server.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from pipeline.config import ServeConfig
from pipeline.model import Transformer
from pipeline.model.generate import SamplingParams, generate
from tests.conftest import free_port, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "sk-test-moeforge"
MODEL = "test-student"


@pytest.fixture(scope="module", params=["moeforge", "llama_cpp"])
def served(request, registered_student, tmp_path_factory):
    """The app served by uvicorn in a thread, on each engine: (its URL, the `ModelServer` behind it)."""
    import uvicorn

    from pipeline.serving.app import create_app
    from pipeline.serving.model_server import ModelServer
    from pipeline.serving.source import resolve

    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")
    settings = ServeConfig.model_validate(
        {
            "max_batch_size": 8,
            "max_tokens_limit": 200,
            "max_n": 3,
            "max_sequences_per_request": 8,
            "max_waiting_sequences": 32,
            "api_key_file": str(key_file),
            "engine": request.param,
            "gguf_quant": "f32",  # llama.cpp's greedy tokens are ours at F32 (tests/pipeline/export)
        }
    )
    source = resolve(f"models:/{MODEL}@champion", registered_student.tracking_uri)
    server = ModelServer(source, settings, registered_student.tracking_uri, tmp_path_factory.mktemp("cache"))
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", timeout=60)
    yield url, server
    http.should_exit = True
    thread.join(timeout=30)
    server.engine.stop()


@pytest.fixture(scope="module")
def app(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(registered_student):
    """The served weights and tokenizer, loaded here to compute what the server must answer."""
    d = registered_student.directory
    return Transformer.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(str(d))


def expected(reference, prompt: str, max_tokens: int, **sampling) -> str:
    model, tok = reference
    ids = tok.encode(prompt, add_special_tokens=False)
    out = generate(
        model, [ids], SamplingParams(max_new_tokens=max_tokens, stop_token_ids=(tok.eos_token_id,), **sampling)
    )[0]
    return tok.decode([t for t in out.tokens if t != tok.eos_token_id], skip_special_tokens=True)


def stats(app: str) -> dict:
    r = httpx.get(f"{app}/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    r.raise_for_status()
    return r.json()


def test_models_reports_the_registered_version_it_loaded_and_the_engine_running_it(client, served, reference):
    (card,) = client.models.list().data
    assert card.id == MODEL
    info = card.model_extra["moeforge"]
    assert info["engine"] == served[1].settings.engine and info["dtype"] in ("float32", "f32")
    assert (info["registered_name"], info["version"], info["alias"]) == (MODEL, "1", "champion")
    assert info["parameters"]["total"] == reference[0].num_params()["total"]
    assert client.models.retrieve(f"{MODEL}@champion").id == MODEL


def test_completions_are_the_model_codes_greedy_output(client, reference):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert r.choices[0].text == expected(reference, "The capital of France is", 12)
    assert r.choices[0].finish_reason in ("length", "stop")
    prompt_tokens = len(reference[1].encode("The capital of France is", add_special_tokens=False))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 12)


def test_chat_uses_the_chat_template_and_the_students_system_prompt(client, reference):
    from pipeline.data.prompts import chat_token_ids, student_messages

    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=10, temperature=0
    )
    model, tok = reference
    ids = chat_token_ids(tok, student_messages("What is 2 + 3?"))
    out = generate(model, [ids], SamplingParams(max_new_tokens=10, stop_token_ids=(tok.eos_token_id,)))[0]
    assert r.choices[0].message.content == tok.decode(
        [t for t in out.tokens if t != tok.eos_token_id], skip_special_tokens=True
    )
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(ids)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_streaming_sends_chunks_while_generating_and_ends_with_done(client, app, reference):
    start = time.perf_counter()
    arrivals, text = [], []
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count."}],
        max_tokens=150,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                arrivals.append(time.perf_counter() - start)
                text.append(c.delta.content)
    whole = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count."}],
        max_tokens=150,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert "".join(text) == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == 150
    assert len(arrivals) > 20 and arrivals[0] < 0.5 * arrivals[-1]  # the first text came long before the last
    with httpx.stream(
        "POST",
        f"{app}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True},
    ) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_n_choices_with_a_seed_are_reproducible_and_distinct(client):
    def ask():
        return client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=16,
            n=3,
            temperature=1.0,
            seed=1234,
            extra_body={"ignore_eos": True},
        )

    a, b = ask(), ask()
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) == 3
    assert a.usage.completion_tokens == 48
    other = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=99, extra_body={"ignore_eos": True}
    )
    assert other.choices[0].text != a.choices[0].text


def test_a_stop_sequence_ends_the_choice_before_it(client, reference):
    full = expected(reference, "Numbers:", 40)
    stop = full[12:16]
    cut = full[: full.find(stop)]
    r = client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt="Numbers:", max_tokens=40, temperature=0, stop=stop, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streams_each_get_their_own_exact_answer(app, reference):
    prompts = [f"Request number {i} says" for i in range(16)]
    wanted = [expected(reference, p, 24) for p in prompts]

    async def one(c: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{app}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(main()) == wanted


BAD = [
    # (what, body or raw bytes, status, error param or code fragment)
    ("malformed JSON", b'{"model": "test-student", "messages": [', 400, "invalid_json"),
    (
        "wrong type",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
        400,
        "max_tokens",
    ),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("unknown role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    (
        "over the context",
        {"model": MODEL, "messages": [{"role": "user", "content": "word " * 240}], "max_tokens": 100},
        400,
        "context_length_exceeded",
    ),
    ("n over the limit", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 4}, 400, "n"),
    (
        "max_tokens over the limit",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 201},
        400,
        "max_tokens",
    ),
    (
        "negative temperature",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        400,
        "temperature",
    ),
]


@pytest.mark.parametrize("what, body, status, marker", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_status_and_an_openai_error_body(app, what, body, status, marker):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{app}/v1/chat/completions", headers=headers, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert marker in f"{err['param']} {err['code']}"
    assert httpx.get(f"{app}/healthz", timeout=10).json()["status"] == "ok"  # the replica is unharmed


def test_the_openai_client_sees_the_same_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10, n=4)
    assert e.value.param == "n"


def test_requests_without_the_key_get_401(app):
    base = openai.OpenAI(base_url=f"{app}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        base.models.list()
    assert e.value.code == "invalid_api_key"
    r = httpx.post(f"{app}/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{app}/healthz", timeout=10).status_code == 200  # probes need no key


def test_a_client_that_disconnects_mid_stream_frees_its_slot(app, client):
    before = stats(app)["tokens_generated"]
    stream = client.completions.create(
        model=MODEL, prompt="Go on", max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while (health := stats(app))["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health["running"] == 0 and health["free_slots"] == health["max_batch_size"]
    assert health["tokens_generated"] - before < 200  # stopped early, not run to max_tokens


def test_a_seed_beyond_int64_is_a_400_not_a_500(app):
    headers = {"Authorization": f"Bearer {KEY}"}
    for seed in (2**70, -(2**63) - 1):
        r = httpx.post(
            f"{app}/v1/completions",
            headers=headers,
            timeout=30,
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "seed": seed},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    r = httpx.post(
        f"{app}/v1/completions",
        headers=headers,
        timeout=30,
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "seed": 2**63 - 1, "n": 3},
    )
    assert r.status_code == 200, r.text  # the largest seed, with the per-choice offsets on top
    assert httpx.get(f"{app}/healthz", timeout=10).json()["status"] == "ok"


def test_the_open_health_probe_says_ok_or_not_and_nothing_else(served, monkeypatch):
    """/healthz needs no key, so it tells nothing about the model, its load or its errors; /stats does, with the key."""
    url, server = served
    r = httpx.get(f"{url}/healthz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert httpx.get(f"{url}/stats", timeout=10).status_code == 401
    assert stats(url)["model"] == MODEL and "free_slots" in stats(url)
    monkeypatch.setattr(server.engine, "last_error", "CUDA error at /srv/secret/weights")
    monkeypatch.setattr(type(server.engine), "alive", property(lambda self: False))
    r = httpx.get(f"{url}/healthz", timeout=10)
    assert r.status_code == 503 and r.json() == {"status": "unavailable"}
    assert "secret" not in httpx.get(f"{url}/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_no_schema_or_docs_are_published(app, path):
    assert httpx.get(f"{app}{path}", timeout=10).status_code == 401  # nothing but /healthz without the key
    assert httpx.get(f"{app}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 404


def test_an_internal_failure_tells_the_client_a_request_id_not_the_exception(served, monkeypatch, caplog):
    url, server = served

    def broken(req):
        raise RuntimeError("boom in /srv/secret/model/path")

    monkeypatch.setattr(server.checks, "chat_prompt", broken)
    caplog.set_level("ERROR", logger="pipeline.serving.protocol")
    r = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 500
    message = r.json()["error"]["message"]
    assert "secret" not in r.text and "RuntimeError" not in r.text
    rid = message.split("request id ")[1].rstrip(").")
    assert rid.startswith("req-")
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and "boom in /srv/secret/model/path" in logged[0].getMessage()  # the details stay in the log


def test_the_key_is_checked_before_the_body_size_and_an_oversized_body_is_refused_unparsed(app):
    big = b'{"model": "test-student", "prompt": "' + b"x" * 2_000_000 + b'"}'
    json_type = {"Content-Type": "application/json"}
    t0 = time.monotonic()
    r = httpx.post(f"{app}/v1/completions", content=big, timeout=30, headers=json_type)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # no key: 401 whatever the size
    r = httpx.post(
        f"{app}/v1/completions", content=big, timeout=30, headers={"Authorization": "Bearer no", **json_type}
    )
    assert r.status_code == 401  # a wrong key too: refused from the headers, the body never read
    r = httpx.post(
        f"{app}/v1/completions", content=big, timeout=30, headers={"Authorization": f"Bearer {KEY}", **json_type}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"  # with the key: the size
    assert time.monotonic() - t0 < 5

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(
        f"{app}/v1/completions", content=chunks(), timeout=30, headers={"Authorization": f"Bearer {KEY}", **json_type}
    )
    assert r.status_code == 413
    assert httpx.get(f"{app}/healthz", timeout=10).json()["status"] == "ok"


def test_a_request_asking_for_too_many_sequences_is_refused_before_any_work(app):
    headers = {"Authorization": f"Bearer {KEY}"}
    many = {"model": MODEL, "prompt": [f"p{i}" for i in range(5000)], "max_tokens": 2}
    t0 = time.monotonic()
    r = httpx.post(f"{app}/v1/completions", headers=headers, json=many, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert time.monotonic() - t0 < 5
    r = httpx.post(
        f"{app}/v1/completions",
        headers=headers,
        timeout=30,
        json={"model": MODEL, "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # 3 prompts x n=3 = 9 > 8
    r = httpx.post(
        f"{app}/v1/completions",
        headers=headers,
        timeout=30,
        json={"model": MODEL, "prompt": ["a", "b"], "n": 3, "max_tokens": 2},
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 6


def test_a_full_engine_queue_answers_503_with_retry_after(served, monkeypatch):
    url, server = served
    real = server.engine.stats
    monkeypatch.setattr(server.engine, "stats", lambda: {**real(), "waiting": 32})  # the queue is full
    r = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"
