"""The gateway through the official async SDK (`openai.AsyncOpenAI`), as an asyncio client meets it: chat with
logprobs equal to the teacher's own, a revoked key's 401, and the SDK's own retry waiting out a 429. The sync
SDK's versions are in tests/test_server.py and tests/test_server_accounts.py."""

import asyncio
import math
import time

import openai
import pytest

from conftest import live_server
from eval.reference.world import reference_task
from guard.gateway.app import create_app
from guard.gateway.store import open_store
from guard.teacher import Sampling

PROMPT = reference_task().eval_items[3].prompt


def test_async_chat_logprobs_are_the_teachers_own(teacher_a, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("acme")

    async def ask(url):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        return await client.chat.completions.create(model="teacher-a", temperature=0, logprobs=True, top_logprobs=5,
                                                    max_tokens=24, messages=[{"role": "user", "content": PROMPT}])

    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store)) as url:
        reply = asyncio.run(ask(url))
    [local] = teacher_a.complete([PROMPT], Sampling(temperature=0, max_new_tokens=24, logprobs=5))
    assert reply.choices[0].message.content == local.text
    served = reply.choices[0].logprobs.content
    assert [t.token for t in served] == [t.token for t in local.token_logprobs]
    for step, mine in zip(served, local.logprobs):
        assert len(step.top_logprobs) == 5
        assert [t.token for t in step.top_logprobs] == [t.token for t in mine]
        assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4) for a, b in zip(step.top_logprobs, mine))
    assert reply.usage.completion_tokens == len(local.token_ids)


def test_async_sdk_gets_401_for_a_revoked_key_and_waits_out_a_429(teacher_a, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    revoked, limited = store.create_key("gone"), store.create_key("limited", rpm=2)
    store.revoke(next(a.key_id for a in store.list_keys() if a.name == "gone"))
    window = 3.0  # the minute of "per minute", shortened so the test can wait one out

    async def ask(url, key, retries):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=retries)
        return await client.completions.create(model="teacher-a", prompt=PROMPT, max_tokens=4)

    async def scenario(url):
        with pytest.raises(openai.AuthenticationError):
            await ask(url, revoked, 3)  # a 401 is final: the SDK does not retry it
        for _ in range(2):
            await ask(url, limited, 0)
        with pytest.raises(openai.RateLimitError):
            await ask(url, limited, 0)
        start = time.monotonic()
        await ask(url, limited, 1)  # one retry: only waiting out Retry-After (not the SDK's own ~1 s backoff) succeeds
        return time.monotonic() - start

    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, rate_window=window)) as url:
        waited = asyncio.run(scenario(url))
    assert waited >= 1.0
    rows = store.records()
    assert [r.account for r in rows] == ["limited"] * 3  # neither the 401 nor the 429 was served or logged
