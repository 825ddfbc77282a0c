"""The gateway in front of an upstream OpenAI-compatible server (a vLLM stand-in: our own server over the
reference teacher), over real HTTP on loopback, as the real `openai` SDK meets it."""

import asyncio
from contextlib import ExitStack

import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from typer.testing import CliRunner

from conftest import free_port, live_server
from eval.reference.world import reference_task
from guard.cli import UPSTREAM_RETRIES, app as cli
from guard.gateway.app import create_app
from guard.openai_teacher import OpenAITeacher
from guard.redaction import AnswerOnly

PROMPTS = [i.prompt for i in reference_task().eval_items[:2]]
GATEWAY_MODEL = "gw-model"  # what clients ask the gateway for; the upstream serves "teacher-a"


def sdk(url: str, key: str = "sk-client") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def gateway(upstream_url: str, key: str | None = None, timeout: float = 30.0, **kwargs):
    """The gateway as `distill-guard gateway --teacher URL/v1 --name gw-model --upstream-model teacher-a` builds it."""
    return create_app(lambda: OpenAITeacher(f"{upstream_url}/v1", model="teacher-a", api_key=key, api="completions",
                                            timeout=timeout, max_retries=UPSTREAM_RETRIES), GATEWAY_MODEL, **kwargs)


def tiny_upstream(answer) -> FastAPI:
    """An upstream whose every POST is answered by `answer(body)`: slow, failing, or echoing what it got."""
    upstream = FastAPI()

    @upstream.post("/v1/{endpoint:path}")
    async def anything(endpoint: str, request: Request):
        return await answer(await request.json())

    return upstream


@pytest.fixture(scope="module")
def proxied(teacher_a):
    """(upstream URL, gateway URL, answer-only gateway URL): the upstream served once for the module."""
    with ExitStack() as stack:
        upstream = stack.enter_context(live_server(create_app(lambda: teacher_a, "teacher-a")))
        plain = stack.enter_context(live_server(gateway(upstream)))
        answer_only = stack.enter_context(live_server(gateway(upstream, policy=AnswerOnly())))
        yield upstream, plain, answer_only


@pytest.mark.parametrize("stream", [False, True])
def test_chat_through_the_gateway_is_the_upstreams_greedy_text_billed_by_the_upstream(proxied, stream):
    upstream, url, _ = proxied
    messages = [{"role": "user", "content": PROMPTS[0]}]
    direct = sdk(upstream).chat.completions.create(model="teacher-a", messages=messages, temperature=0, max_tokens=48)
    ask = dict(model=GATEWAY_MODEL, messages=messages, temperature=0, max_tokens=48)
    if stream:
        chunks = list(sdk(url).chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        proxied_answer = sdk(url).chat.completions.create(**ask)
        text, usage = proxied_answer.choices[0].message.content, proxied_answer.usage
        assert proxied_answer.model == GATEWAY_MODEL
    assert text == direct.choices[0].message.content
    assert usage.prompt_tokens == direct.usage.prompt_tokens > 0  # counted by the upstream, not 0
    assert usage.completion_tokens == direct.usage.completion_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_completions_through_the_gateway_are_the_upstreams_greedy_text(proxied, stream):
    upstream, url, _ = proxied
    direct = sdk(upstream).completions.create(model="teacher-a", prompt=PROMPTS, temperature=0, max_tokens=48)
    ask = dict(model=GATEWAY_MODEL, prompt=PROMPTS, temperature=0, max_tokens=48)
    if stream:
        chunks = list(sdk(url).completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        texts = ["".join(ch.text for c in chunks for ch in c.choices if ch.index == i) for i in range(len(PROMPTS))]
        usage = chunks[-1].usage
    else:
        whole = sdk(url).completions.create(**ask)
        texts, usage = [c.text for c in whole.choices], whole.usage
    assert texts == [c.text for c in direct.choices]
    assert usage.prompt_tokens == direct.usage.prompt_tokens > 0
    assert usage.completion_tokens == direct.usage.completion_tokens > 0


def test_answer_only_redaction_applies_in_front_of_the_upstream(proxied):
    upstream, _, url = proxied
    messages = [{"role": "user", "content": PROMPTS[1]}]
    direct = sdk(upstream).chat.completions.create(model="teacher-a", messages=messages, temperature=0)
    full = direct.choices[0].message.content
    expected = AnswerOnly().redact([PROMPTS[1]], [full])[0].text
    assert expected != full  # the upstream reasons before it answers
    ask = dict(model=GATEWAY_MODEL, messages=messages, temperature=0)
    whole = sdk(url).chat.completions.create(**ask)
    streamed = list(sdk(url).chat.completions.create(**ask, stream=True))
    assert whole.choices[0].message.content == expected
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    assert whole.usage.completion_tokens == direct.usage.completion_tokens  # withheld reasoning is still billed
    assert whole.usage.prompt_tokens == direct.usage.prompt_tokens > 0


def test_the_whole_conversation_reaches_the_upstream():
    async def echo(body):
        turns = " | ".join(f"{m['role']}: {m['content']}" for m in body["messages"])
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": turns}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}

    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who is Kalon?"},
                    {"role": "assistant", "content": "a baker"}, {"role": "user", "content": "and her boss?"}]
    with live_server(tiny_upstream(echo)) as upstream, live_server(gateway(upstream)) as url:
        answer = sdk(url).chat.completions.create(model=GATEWAY_MODEL, messages=conversation)
    assert answer.choices[0].message.content == ("system: be brief | user: who is Kalon? | assistant: a baker | "
                                                 "user: and her boss?")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 3)


def failure(upstream_url: str, **settings) -> openai.APIStatusError:
    """The error the client gets when the gateway (`settings`) in front of `upstream_url` is asked a chat."""
    with live_server(gateway(upstream_url, **settings)) as url:
        with pytest.raises(openai.APIStatusError) as caught:
            sdk(url).chat.completions.create(model=GATEWAY_MODEL, messages=[{"role": "user", "content": PROMPTS[0]}])
    assert set(caught.value.body) == {"message", "type", "code"}  # OpenAI's error shape
    assert upstream_url not in caught.value.body["message"]  # the upstream's address stays the provider's
    return caught.value


def test_a_slow_upstream_answer_holds_up_no_other_client():
    """A proxy does not queue requests behind each other (no batch waits for a slow one): requests sent while
    a slow one is in flight reach the upstream before it answers."""
    slow_in_flight, overlapped = False, []

    async def echo(body):
        nonlocal slow_in_flight
        if body["prompt"] == "slow":
            slow_in_flight = True
            await asyncio.sleep(1.5)
            slow_in_flight = False
        else:
            overlapped.append(slow_in_flight)
        return JSONResponse({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "teacher-a",
                             "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    async def ask_all(url):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-client", max_retries=0)

        async def ask(prompt, after):
            await asyncio.sleep(after)
            return await client.completions.create(model=GATEWAY_MODEL, prompt=prompt, max_tokens=2)

        return await asyncio.gather(ask("slow", 0), *(ask(p, 0.3) for p in "abcd"))

    with live_server(tiny_upstream(echo)) as upstream, live_server(gateway(upstream)) as url:
        answers = asyncio.run(ask_all(url))
    assert [a.choices[0].text for a in answers] == ["ok"] * 5
    assert overlapped == [True] * 4


def test_an_upstream_slower_than_the_timeout_is_a_504():
    async def slow(body):
        await asyncio.sleep(2.0)
        return JSONResponse({})

    with live_server(tiny_upstream(slow)) as upstream:
        error = failure(upstream, timeout=0.3)
    assert error.status_code == 504 and error.body["code"] == "upstream_timeout"


def test_a_closed_upstream_port_is_a_502():
    error = failure(f"http://127.0.0.1:{free_port()}")
    assert error.status_code == 502 and error.body["code"] == "upstream_failed"


@pytest.mark.parametrize("answer", ["500", "text", "json"])
def test_an_upstream_that_fails_or_answers_garbage_is_a_502(answer):
    async def broken(body):
        if answer == "500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        if answer == "text":
            return PlainTextResponse("<html>not a completion</html>")
        return JSONResponse({"choices": [{"index": 0, "note": "no message here"}]})

    with live_server(tiny_upstream(broken)) as upstream:
        error = failure(upstream)
    assert error.status_code == 502 and error.body["code"] == "upstream_failed"


def test_an_upstream_400_reaches_the_client_as_a_400_with_the_upstreams_message(proxied):
    upstream, url, _ = proxied
    with pytest.raises(openai.BadRequestError) as caught:  # the gateway cannot know the upstream's context
        sdk(url).chat.completions.create(model=GATEWAY_MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                         max_tokens=4000)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 128 tokens" in caught.value.body["message"]


def test_an_upstream_429_reaches_the_client_with_its_retry_after_in_the_gateways_words():
    async def busy(body):
        return JSONResponse({"error": {"message": "org-7731 over its vendor quota", "type": "rate_limit_error",
                                       "code": "busy"}}, status_code=429, headers={"retry-after": "1"})

    with live_server(tiny_upstream(busy)) as upstream, live_server(gateway(upstream)) as url:
        with pytest.raises(openai.RateLimitError) as caught:
            sdk(url).completions.create(model=GATEWAY_MODEL, prompt=PROMPTS[0], max_tokens=4)
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body["code"] == "upstream_rate_limited" and "org-7731" not in caught.value.body["message"]


def test_an_upstream_404_is_the_gateways_failure_and_names_nothing_of_the_upstream():
    """The client asked for the gateway's model, which exists: an upstream that does not know its own model (or
    route) is the provider's misconfiguration, a 502 that says nothing of the upstream's names."""
    async def unknown(body):
        return JSONResponse({"error": {"message": "The model `internal-llama-70b-rc3` does not exist",
                                       "type": "invalid_request_error", "code": "model_not_found"}}, status_code=404)

    with live_server(tiny_upstream(unknown)) as upstream:
        error = failure(upstream)
    assert error.status_code == 502 and error.body["code"] == "upstream_failed"
    assert "internal-llama" not in error.body["message"]


def test_upstream_credentials_refused_is_a_502_that_names_no_key(teacher_a):
    with live_server(create_app(lambda: teacher_a, "teacher-a", {"sk-upstream-right"})) as upstream:
        error = failure(upstream, key="sk-upstream-wrong")
    assert error.status_code == 502 and error.body["code"] == "upstream_auth_failed"
    assert "credentials" in error.body["message"] and "sk-" not in error.body["message"]


@pytest.mark.parametrize("defense", ["watermark", "watermark+answer-only"])
def test_the_gateway_refuses_to_watermark_an_upstream(defense):
    result = CliRunner().invoke(cli, ["gateway", "--teacher", "http://127.0.0.1:1/v1", "--name", "m",
                                      "--defense", defense, "--lab"])
    said = " ".join(result.output.replace("│", " ").split())  # unwrapped from rich's error panel
    assert result.exit_code != 0 and "logits" in said and "upstream URL" in said, said


def test_the_gateway_asks_the_name_of_an_upstreams_model():
    result = CliRunner().invoke(cli, ["gateway", "--teacher", "http://127.0.0.1:1/v1", "--defense", "answer-only"])
    assert result.exit_code != 0 and "--name MODEL" in " ".join(result.output.replace("│", " ").split())
