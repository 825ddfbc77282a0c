"""The OpenAI-compatible server as real clients meet it: the `openai` SDK (sync and async) and raw HTTP on
loopback, against the reference teacher."""

import asyncio
import copy
import json

import httpx
import openai
import pytest

from conftest import live_server
from eval.reference.world import reference_task
from guard.gateway.app import create_app
from guard.hf_teacher import HFTeacher
from guard.reasoning import split_reasoning
from guard.redaction import AnswerOnly
from guard.teacher import GREEDY, Teacher

PROMPTS = [i.prompt for i in reference_task().eval_items[:2]]
MiB = 1 << 20


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_streamed_chat_joins_to_the_greedy_text_and_bills_the_same(teacher_a):
    with live_server(create_app(lambda: teacher_a, "teacher-a")) as url:
        client = sdk(url)
        ask = {"model": "teacher-a", "temperature": 0, "messages": [{"role": "user", "content": PROMPTS[0]}]}
        whole = client.chat.completions.create(**ask)
        chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert len([d for d in deltas if d.content]) > 1  # a plain teacher streams piece by piece
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == whole.usage.completion_tokens
    expected_prompt = len(teacher_a.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"])
    assert usage.prompt_tokens == whole.usage.prompt_tokens == expected_prompt > 0
    assert whole.usage.total_tokens == expected_prompt + whole.usage.completion_tokens


def test_streamed_completions_join_to_the_greedy_text_async(teacher_a):
    async def ask(url):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        whole = await client.completions.create(model="teacher-a", prompt=PROMPTS, temperature=0)
        stream = await client.completions.create(model="teacher-a", prompt=PROMPTS, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        return whole, [chunk async for chunk in stream]

    with live_server(create_app(lambda: teacher_a, "teacher-a")) as url:
        whole, chunks = asyncio.run(ask(url))
    local = teacher_a.complete(PROMPTS, GREEDY)
    for index, completion in enumerate(local):
        streamed = "".join(ch.text for c in chunks for ch in c.choices if ch.index == index)
        assert streamed == whole.choices[index].text == completion.text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == sum(len(c.token_ids) for c in local)
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 0


def test_answer_only_streams_no_reasoning_and_bills_the_hidden_tokens(teacher_a):
    full = teacher_a.complete(PROMPTS[:1], GREEDY)[0]
    reasoning, answer = split_reasoning(full.text)
    assert reasoning  # the reference teacher reasons before it answers, so there is something to withhold
    with live_server(create_app(lambda: teacher_a, "teacher-a", policy=AnswerOnly())) as url:
        client = sdk(url)
        ask = {"model": "teacher-a", "temperature": 0, "messages": [{"role": "user", "content": PROMPTS[0]}]}
        whole = client.chat.completions.create(**ask)
        chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == [whole.choices[0].message.content] == [f"answer: {answer}"]  # all at the end, nothing else
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == len(full.token_ids)


def test_chat_with_a_template_uses_the_whole_conversation(teacher_a):
    tokenizer = copy.deepcopy(teacher_a.tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    templated = HFTeacher("teacher-a", model=teacher_a.model, tokenizer=tokenizer)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "answer: hi"}, {"role": "user", "content": PROMPTS[0]}]
    with live_server(create_app(lambda: templated, "teacher-a")) as url:
        reply = sdk(url).chat.completions.create(model="teacher-a", temperature=0, max_tokens=24, messages=messages)
    # transformers' own path: the template over every message, then greedy generate
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = teacher_a.model.generate(**ids, do_sample=False, max_new_tokens=24, pad_token_id=tokenizer.eos_token_id)
    expected = out[0, ids["input_ids"].shape[1]:].tolist()
    expected = expected[:expected.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in expected else expected
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == ids["input_ids"].shape[1]


def test_bounds_answer_in_openai_shape(teacher_a):
    app = create_app(lambda: teacher_a, "teacher-a", max_prompts=3)
    with live_server(app) as url:
        def post(path, **kwargs):
            return httpx.post(f"{url}/v1/{path}", timeout=60, **kwargs)

        long_prompt = " ".join(["Kalon"] * 100)
        n = len(teacher_a.tokenizer(long_prompt, add_special_tokens=False)["input_ids"])
        overflow = post("completions", json={"model": "teacher-a", "prompt": long_prompt, "max_tokens": 64})
        message = overflow.json()["error"]["message"]
        assert overflow.status_code == 400 and overflow.json()["error"]["code"] == "context_length_exceeded"
        assert f"{n} in the prompt" in message and "64 in the completion" in message
        assert str(teacher_a.context_length) in message

        many = post("completions", json={"model": "teacher-a", "prompt": PROMPTS * 2})
        assert many.status_code == 400 and "at most 3" in many.json()["error"]["message"]
        assert post("completions", json={"model": "teacher-a", "prompt": PROMPTS[:1] * 3,
                                         "max_tokens": 2}).status_code == 200

        malformed = post("chat/completions", content=b'{"model": "teacher-a", "messages": [',
                         headers={"content-type": "application/json"})
        assert malformed.status_code == 400 and "error" in malformed.json()



def sized(path: str, size: int) -> bytes:
    """A request body of exactly `size` bytes for `path`, valid but for its one long prompt."""
    ask = {"model": "teacher-a", "prompt": ""} if path == "completions" else \
        {"model": "teacher-a", "messages": [{"role": "user", "content": ""}]}
    return json.dumps(ask).replace('""', '"' + "a" * (size - len(json.dumps(ask))) + '"', 1).encode()


def test_a_body_over_the_limit_is_413_on_both_routes_with_a_declared_length_or_chunked(teacher_a):
    """The gateway's 1 MiB limit, one byte either side, on each route; a declared Content-Length is refused
    before the body is read, a chunked body (no length) once what arrived passes the limit."""
    statuses = {}
    with live_server(create_app(lambda: teacher_a, "teacher-a")) as url:  # max_body_bytes: 1 MiB by default
        for path in ("completions", "chat/completions"):
            for size in (MiB, MiB + 1):
                body = sized(path, size)
                # framed by a declared length, or chunked (transfer-encoding, no length), as httpx sends a generator
                for framing, content in (("content-length", body),
                                         ("transfer-encoding", (body[i:i + 65536] for i in range(0, size, 65536)))):
                    reply = httpx.post(f"{url}/v1/{path}", content=content, timeout=60,
                                       headers={"content-type": "application/json"})
                    assert [h for h in ("content-length", "transfer-encoding") if h in reply.request.headers] == \
                        [framing]
                    code = reply.json()["error"]["code"] if reply.status_code >= 400 else None
                    statuses[path, size, framing] = (reply.status_code, code)
    too_large = (413, "request_too_large")
    assert {case: status == too_large for case, status in statuses.items()} == \
        {(path, size, framing): size > MiB for path, size, framing in statuses}, statuses


@pytest.mark.parametrize("path, ask, kind", [
    ("chat/completions", {"messages": [{"role": "user", "content": PROMPTS[0]}]}, "chat.completion.chunk"),
    ("completions", {"prompt": PROMPTS[0]}, "text_completion")])
def test_the_stream_is_server_sent_events_in_openai_chunk_format(teacher_a, path, ask, kind):
    with live_server(create_app(lambda: teacher_a, "teacher-a")) as url:
        reply = httpx.post(f"{url}/v1/{path}", json={"model": "teacher-a", "temperature": 0, "stream": True, **ask})
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = reply.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(c["object"] == kind and c["model"] == "teacher-a" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] == "stop" and finishes[:-1] == [None] * (len(chunks) - 1)


class Broken(Teacher):
    def complete(self, prompts, sampling=GREEDY, callers=None):
        raise RuntimeError("internal detail: /srv/secret/path")


def test_an_unexpected_error_is_a_generic_500_without_a_traceback(caplog):
    with live_server(create_app(Broken, "teacher-a")) as url:
        reply = httpx.post(f"{url}/v1/completions", json={"model": "teacher-a", "prompt": "hi"})
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["type"] == "server_error" and "secret" not in reply.text and "Traceback" not in reply.text
    assert "internal detail" in caplog.text  # logged on the server, for its operator
    assert json.loads(reply.text) == {"error": error}
