"""Token limits are reserved, not merely checked: a request is admitted only if its worst case (each prompt's
tokens plus `max_tokens`, for every prompt) fits what is left of the account's window, and what it did not
spend is refunded once its audit row is written. Each prompt of a completions batch is one request against
rpm. In this process's memory and in a real Redis alike; real HTTP, real SQLite (PostgreSQL where the store is
stopped under the gateway)."""

import threading
import time
from contextlib import ExitStack

import httpx
import pytest

import eval.local_servers as local_servers
from conftest import live_server
from guard.gateway.app import create_app
from guard.gateway.errors import APIError
from guard.gateway.limits import RateLimiter
from guard.gateway.store import Account, open_store

PROMPT = "question: where does Kalon live?\n"


@pytest.fixture(params=["in-memory", "redis"])
def shared(request):
    """The rate limiter's counters: this process's memory (one gateway), or a real Redis (replicas')."""
    return request.getfixturevalue("redis_state") if request.param == "redis" else None


def post(url: str, key: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "teacher-a", **body},
                      headers={"authorization": f"Bearer {key}"}, timeout=60)


def test_20_concurrent_requests_spend_at_most_the_token_limit(teacher_a, tmp_path, shared):
    """20 requests at once, each of 4 prompts and max_tokens 48, against tpm 2000: every one sees the same
    empty window when it arrives, so a limit that is only checked admits them all (some 4,000 tokens). Reserved,
    what the audit log says was spent stays within 2000 x 1.05."""
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("batch", tpm=2000)
    body = {"prompt": [PROMPT] * 4, "max_tokens": 48, "temperature": 1.0}
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, shared=shared,
                                max_batch=64)) as url:
        barrier, statuses = threading.Barrier(20), []

        def client():
            barrier.wait()
            statuses.append(post(url, key, body).status_code)

        threads = [threading.Thread(target=client) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    spent = sum(r.prompt_tokens + r.completion_tokens for r in store.records() if r.status == 200)
    print(f"\nstatuses {sorted(statuses)}; spent {spent} tokens of tpm 2000")
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 1
    assert spent <= 2000 * 1.05


def test_each_prompt_of_a_completions_batch_counts_against_rpm(teacher_a, tmp_path, shared):
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("batch", rpm=5)
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, shared=shared)) as url:
        first = post(url, key, {"prompt": [PROMPT] * 4, "max_tokens": 2})
        second = post(url, key, {"prompt": [PROMPT] * 2, "max_tokens": 2})
        third = post(url, key, {"prompt": PROMPT, "max_tokens": 2})
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1  # 4 + 2 > 5
    assert third.status_code == 200 and third.headers["x-ratelimit-remaining-requests"] == "0"


def test_unused_tokens_are_refunded_once_the_request_is_served(teacher_a, tmp_path, shared):
    """The reservation is the worst case; the account is left charged what the audit row says it spent."""
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("refund", tpm=1000)
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, shared=shared)) as url:
        first = post(url, key, {"prompt": PROMPT, "max_tokens": 100, "temperature": 0.0})
        second = post(url, key, {"prompt": PROMPT, "max_tokens": 1})
    assert first.status_code == second.status_code == 200
    used = first.json()["usage"]["total_tokens"]
    [n_prompt] = [r.prompt_tokens for r in store.records()][:1]
    assert used < n_prompt + 100  # the greedy answer ends well before max_tokens
    # the second request's headers: its own reservation and the first's spend, not the first's 100
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - used - (n_prompt + 1))


def test_a_request_whose_worst_case_alone_exceeds_the_token_limit_is_told_so(teacher_a, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("small", tpm=100)
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store)) as url:
        reply = post(url, key, {"prompt": [PROMPT] * 4, "max_tokens": 64})
    assert reply.status_code == 429 and "tokens" in reply.json()["error"]["message"]
    assert reply.json()["error"]["code"] == "rate_limit_exceeded"


def test_streamed_responses_carry_the_rate_limit_headers(teacher_a, tmp_path, shared):
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("streamer", rpm=10, tpm=10_000)
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, shared=shared)) as url:
        auth = {"authorization": f"Bearer {key}"}
        streams = [httpx.post(url + path, json={"model": "teacher-a", "stream": True, "max_tokens": 4, **body},
                              headers=auth, timeout=60)
                   for path, body in (("/v1/completions", {"prompt": PROMPT}),
                                      ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}))]
    for reply in streams:
        assert reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]")
        assert reply.headers["x-ratelimit-limit-requests"] == "10"
        assert reply.headers["x-ratelimit-limit-tokens"] == "10000"
        assert reply.headers["x-request-id"]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in streams] == ["9", "8"]


def test_the_in_memory_window_is_kept_on_the_monotonic_clock_when_the_wall_clock_steps(monkeypatch):
    """NTP (or an operator) steps the wall clock an hour ahead: a window kept on wall time would let every
    request in it expire at once, and the account start afresh. (The wall clock cannot be stepped for a
    test; `time.time` is.)"""
    limiter, account = RateLimiter(window=60.0), Account("busy", key_id="k", rpm=2)
    limiter.admit(account)
    limiter.admit(account)
    stepped = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: stepped)
    with pytest.raises(APIError) as refused:
        limiter.admit(account)
    assert refused.value.status_code == 429


def test_tokens_are_charged_only_once_the_audit_row_is_durable(teacher_a):
    """The store's PostgreSQL stops under a running gateway: the request gets a 503 and is not served, so its
    account is charged nothing for it (its reservation refunded), where a charge made before the write would
    stay for the whole window."""
    from guard.gateway.store import open_store as open_postgres

    with ExitStack() as stack:
        down = stack.enter_context(ExitStack())
        store = stack.enter_context(open_postgres(down.enter_context(local_servers.postgres(fsync=False))))
        key = store.create_key("acme", tpm=10_000)
        app = create_app(lambda: teacher_a, "teacher-a", store=store, key_cache_seconds=600)
        url = stack.enter_context(live_server(app))
        served = post(url, key, {"prompt": PROMPT, "max_tokens": 8})
        assert served.status_code == 200
        spent = served.json()["usage"]["total_tokens"]
        down.close()  # PostgreSQL stops; the key stays cached
        refused = post(url, key, {"prompt": PROMPT, "max_tokens": 8})
        assert refused.status_code == 503
        limiter = app.state.limiter
        assert limiter.used["acme"] == spent
