"""A request checked against a deployment (`pipeline/serving/request_checks.py`), without a model, an engine or a
server: the teacher's real tokenizer, small limits, and requests parsed by the same models the app uses."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pipeline.config import ServeConfig
from pipeline.data.prompts import INSTRUCTION, chat_token_ids, student_messages
from pipeline.serving.openai_format import CHAT_SHAPE, TEXT_SHAPE
from pipeline.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from pipeline.serving.request_checks import CHAT, COMPLETIONS, RequestChecks

MODEL = "test-student"
CONTEXT = 128


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    return AutoTokenizer.from_pretrained(str(teacher_dir))


@pytest.fixture(scope="module")
def checks(tokenizer) -> RequestChecks:
    settings = ServeConfig(max_n=3, max_tokens_limit=40, max_sequences_per_request=8, max_waiting_sequences=32)
    return RequestChecks(
        settings,
        model_id=MODEL,
        names=frozenset({MODEL, f"{MODEL}@champion"}),
        tokenizer=tokenizer,
        context=CONTEXT,
        vocab_size=len(tokenizer),
        eos=tokenizer.eos_token_id,
        system_prompt=INSTRUCTION,
    )


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw})


def cmpl(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", **kw})


def refused(checks: RequestChecks, req, waiting: int = 0) -> ApiError:
    with pytest.raises(ApiError) as e:
        checks.check(req, waiting)
    return e.value


def test_a_completions_request_is_one_choice_per_prompt_and_n_with_per_choice_seeds(checks, tokenizer):
    req = checks.check(cmpl(prompt=["one two", "three"], n=2, seed=7, max_tokens=5, stop=["\n"]), waiting=0)
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in ("one two", "three")]
    assert req.endpoint is COMPLETIONS and req.endpoint.shape is TEXT_SHAPE and req.prompts == prompts
    assert [(c.index, c.prompt) for c in req.choices] == [
        (0, prompts[0]),
        (1, prompts[0]),
        (2, prompts[1]),
        (3, prompts[1]),
    ]
    assert [c.params.seed for c in req.choices] == [7, 8, 9, 10]
    assert {(c.params.max_new_tokens, c.params.stop_token_ids) for c in req.choices} == {(5, (tokenizer.eos_token_id,))}
    assert (req.stops, req.stream, req.include_usage) == (["\n"], False, False)
    token_prompt = checks.check(cmpl(prompt=[5, 6, 7], ignore_eos=True, temperature=0.5, top_p=0.9), waiting=0)
    (only,) = token_prompt.choices
    assert only.prompt == [5, 6, 7] and only.params.stop_token_ids == () and only.params.seed is None
    assert (only.params.temperature, only.params.top_p, only.params.max_new_tokens) == (0.5, 0.9, 16)  # OpenAI's 16


def test_a_chat_gets_the_students_system_prompt_unless_it_brings_its_own(checks, tokenizer):
    req = checks.check(chat(stream=True, stream_options={"include_usage": True}), waiting=0)
    assert req.endpoint is CHAT and req.endpoint.shape is CHAT_SHAPE and (req.stream, req.include_usage) == (True, True)
    assert req.prompts == [chat_token_ids(tokenizer, student_messages("hi"))]
    own = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert checks.check(chat(messages=own), waiting=0).prompts == [
        chat_token_ids(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    ]


def test_without_max_tokens_a_choice_gets_what_fits_up_to_the_limit(checks):
    (choice,) = checks.check(chat(), waiting=0).choices
    assert len(choice.prompt) < CONTEXT - 40 and choice.params.max_new_tokens == 40  # the limit
    (choice,) = checks.check(cmpl(prompt=[1] * 100, max_tokens=None), waiting=0).choices
    assert choice.params.max_new_tokens == CONTEXT - 100  # the room left
    (choice,) = checks.check(chat(max_completion_tokens=3, max_tokens=30), waiting=0).choices
    assert choice.params.max_new_tokens == 3  # max_completion_tokens wins over the older field


@pytest.mark.parametrize(
    "req, status, param, code",
    [
        (cmpl(prompt=["p"] * 9), 400, "prompt", None),
        (cmpl(prompt=["p"] * 3, n=3), 400, "n", None),
        (chat(model="gpt-9"), 404, "model", "model_not_found"),
        (chat(n=4), 400, "n", None),
        (cmpl(max_tokens=41), 400, "max_tokens", None),
        (chat(max_completion_tokens=41), 400, "max_tokens", None),
        (chat(messages=[{"role": "user", "content": "word " * 150}]), 400, "messages", "context_length_exceeded"),
        (cmpl(prompt=[1] * 100, max_tokens=29), 400, "prompt", "context_length_exceeded"),
        (cmpl(prompt=[1] * CONTEXT, max_tokens=None), 400, "prompt", "context_length_exceeded"),
        (cmpl(prompt=""), 400, "prompt", None),
        (cmpl(prompt=[[1, 2], [49152]]), 400, "prompt", None),
    ],
    ids=[
        "9 prompts",
        "3 prompts x n=3",
        "unknown model",
        "n over max_n",
        "max_tokens over the limit",
        "max_completion_tokens over the limit",
        "chat over the context",
        "prompt + max_tokens over the context",
        "a prompt that fills the context",
        "empty prompt",
        "token id outside the vocabulary",
    ],
)
def test_a_request_over_a_limit_gets_its_status_and_error(checks, req, status, param, code):
    e = refused(checks, req)
    assert (e.status, e.param, e.code, e.type) == (status, param, code, "invalid_request_error"), e.message


def test_a_full_queue_is_a_503_with_retry_after(checks):
    e = refused(checks, cmpl(prompt=["a", "b"]), waiting=31)
    assert (e.status, e.code, e.type, e.headers) == (503, "overloaded", "server_error", {"Retry-After": "1"})
    assert checks.check(cmpl(prompt=["a", "b"]), waiting=30).choices  # exactly full is still in


def test_the_sequence_count_is_checked_before_any_prompt_and_the_prompts_before_the_rest(checks):
    # an empty prompt among too many prompts: the count is refused first, before anything is tokenized
    assert refused(checks, cmpl(prompt=["p"] * 8 + [""])).message.startswith("9 prompt(s) x n=1")
    assert refused(checks, cmpl(prompt=["p"] * 9), waiting=1000).status == 400  # the cap before the queue
    # a bad prompt and an unknown model: the prompt is refused first
    assert refused(checks, cmpl(model="gpt-9", prompt="")).param == "prompt"
    # an unknown model with n and max_tokens over their limits: the model, then n, then max_tokens
    assert refused(checks, chat(model="gpt-9", n=4, max_tokens=41)).status == 404
    assert refused(checks, chat(n=4, max_tokens=41)).param == "n"
