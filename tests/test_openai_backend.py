"""The OpenAI-compatible backend against a real server on loopback, through the real `openai` client."""

import asyncio
import time

import httpx
import pytest
from fastapi.responses import JSONResponse

from conftest import live_server
from eval.reference.world import reference_task
from guard.gateway.app import create_app
from guard.openai_teacher import OpenAITeacher, TeacherAuthError, TeacherHTTPError
from guard.teacher import GREEDY, Sampling

PROMPTS = [i.prompt for i in reference_task().eval_items[:4]]


def serve(teacher, api_keys=None, fail_first=0, status=429, headers=None, delay=0.0):
    """Our server for `teacher`, optionally failing its first requests with `status`."""
    app = create_app(lambda: teacher, "teacher-a", api_keys)
    app.state.requests = 0

    @app.middleware("http")
    async def flaky(request, call_next):
        app.state.requests += 1
        if delay:
            await asyncio.sleep(delay)
        if app.state.requests <= fail_first:
            return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, status_code=status,
                                headers=headers or {})
        return await call_next(request)

    return app


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_greedy_over_http_matches_local(teacher_a, api):
    app = serve(teacher_a)
    with live_server(app) as url:
        remote = OpenAITeacher(f"{url}/v1", model="teacher-a", api=api).complete(PROMPTS, GREEDY)
    local = teacher_a.complete(PROMPTS, GREEDY)
    assert [r.text for r in remote] == [c.text for c in local]
    assert [r.answer for r in remote] == [c.answer for c in local]


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_logprobs_over_http(teacher_a, api):
    app = serve(teacher_a)
    sampling = Sampling(temperature=1.0, seed=5, logprobs=3)
    with live_server(app) as url:
        remote = OpenAITeacher(f"{url}/v1", model="teacher-a", api=api).complete(PROMPTS[:1], sampling)[0]
    local = teacher_a.complete(PROMPTS[:1], sampling)[0]
    assert remote.text == local.text
    assert len(remote.logprobs) == len(local.token_ids) and all(len(step) == 3 for step in remote.logprobs)
    assert [t.logprob for t in remote.logprobs[0]] == pytest.approx([t.logprob for t in local.logprobs[0]], abs=1e-5)
    assert [t.token for t in remote.token_logprobs] == [t.token for t in local.token_logprobs]


def test_429_with_retry_after_is_honoured(teacher_a):
    app = serve(teacher_a, fail_first=1, headers={"Retry-After": "2"})
    with live_server(app) as url:
        teacher = OpenAITeacher(f"{url}/v1", model="teacher-a", max_retries=2, concurrency=1)
        start = time.monotonic()
        completion = teacher.complete(PROMPTS[:1], GREEDY)[0]
        elapsed = time.monotonic() - start
    assert completion.answer
    assert app.state.requests == 2
    assert 2.0 <= elapsed < 10.0  # waited the server's 2 s, not the client's sub-second default backoff


def test_5xx_is_retried_then_gives_up_clearly(teacher_a):
    app = serve(teacher_a, fail_first=2, status=503, headers={"Retry-After-Ms": "50"})
    with live_server(app) as url:
        assert OpenAITeacher(f"{url}/v1", model="teacher-a", max_retries=3).complete(PROMPTS[:1], GREEDY)[0].answer
        assert app.state.requests == 3
        app.state.requests = -10  # the next 11 requests fail
        with pytest.raises(TeacherHTTPError, match="HTTP 503 after retries"):
            OpenAITeacher(f"{url}/v1", model="teacher-a", max_retries=1).complete(PROMPTS[:1], GREEDY)


def test_401_fails_clearly(teacher_a):
    app = serve(teacher_a, api_keys={"sk-right"})
    with live_server(app) as url:
        with pytest.raises(TeacherAuthError, match="rejected the API key \\(HTTP 401\\)"):
            OpenAITeacher(f"{url}/v1", model="teacher-a", api_key="sk-wrong").complete(PROMPTS[:1], GREEDY)
        assert app.state.requests == 1  # a 401 is not retried
        ok = OpenAITeacher(f"{url}/v1", model="teacher-a", api_key="sk-right").complete(PROMPTS[:1], GREEDY)
    assert ok[0].answer


def test_timeout_is_enforced(teacher_a):
    app = serve(teacher_a, delay=3.0)
    with live_server(app) as url:
        start = time.monotonic()
        with pytest.raises(TeacherHTTPError, match="cannot reach"):
            OpenAITeacher(f"{url}/v1", model="teacher-a", timeout=0.5, max_retries=0).complete(PROMPTS[:1], GREEDY)
        assert time.monotonic() - start < 2.5


def test_malformed_requests_get_clear_openai_errors(teacher_a):
    app = serve(teacher_a)
    with live_server(app) as url:
        bad_json = httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                              headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and "error" in bad_json.json()
        bad_field = httpx.post(f"{url}/v1/chat/completions",
                               json={"model": "teacher-a", "messages": [{"role": "user", "content": "hi"}],
                                     "temperature": -1})
        assert bad_field.status_code == 400 and "temperature" in bad_field.json()["error"]["message"]
        no_user = httpx.post(f"{url}/v1/chat/completions",
                             json={"model": "teacher-a", "messages": [{"role": "system", "content": "x"}]})
        assert no_user.status_code == 400 and "user message" in no_user.json()["error"]["message"]
        wrong_model = httpx.post(f"{url}/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
        assert wrong_model.status_code == 404 and wrong_model.json()["error"]["code"] == "model_not_found"
