"""Concurrent requests reach the teacher in batches, not one behind another: through the gateway with the real
`openai` SDK on loopback, against the reference teacher, with a teacher that counts the batches it is given."""

import asyncio
import threading
import time

import openai
import pytest

from conftest import live_server
from eval.reference.world import reference_task
from guard.gateway.app import create_app
from guard.gateway.batcher import Batcher
from guard.teacher import GREEDY, Caller, Defense, Sampling

PROMPTS = [i.prompt for i in reference_task().eval_items[:12]]
POISON = "<poison>"


class Counting(Defense):
    """The teacher it wraps, recording each call's prompts and samplings; a batch holding POISON fails whole."""

    def __init__(self, teacher):
        super().__init__(teacher)
        self.batches: list[list[str]] = []
        self.samplings: list[Sampling] = []

    def complete(self, prompts, sampling=Sampling(), callers=None):
        self.batches.append(list(prompts))
        self.samplings.append(sampling)
        if any(POISON in p for p in prompts):
            raise RuntimeError("the teacher failed on this batch")
        return self.teacher.complete(prompts, sampling, callers)


async def ask_all(url: str, prompts: list[str]) -> list[str | Exception]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)  # a hang fails, not stalls

    async def one(prompt):
        response = await client.completions.create(model="teacher-a", prompt=prompt, temperature=0)
        return response.choices[0].text

    return await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)


def test_concurrent_clients_are_batched_and_each_gets_its_own_greedy_text(teacher_a):
    counting = Counting(teacher_a)
    # a wide window, so that requests sent together meet in a batch however slowly this machine schedules them
    with live_server(create_app(lambda: counting, "teacher-a", batch_window=0.3, max_batch=16)) as url:
        texts = asyncio.run(ask_all(url, PROMPTS))
    assert sorted(p for batch in counting.batches for p in batch) == sorted(PROMPTS)
    assert max(map(len, counting.batches)) > 1
    assert texts == [teacher_a.complete([p], GREEDY)[0].text for p in PROMPTS]


def test_the_prompts_of_one_completions_request_share_a_batch(teacher_a):
    counting = Counting(teacher_a)
    with live_server(create_app(lambda: counting, "teacher-a", batch_window=0.05, max_batch=16)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        whole = client.completions.create(model="teacher-a", prompt=PROMPTS[:6], temperature=0)
    assert counting.batches == [PROMPTS[:6]]
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == \
        [c.text for c in teacher_a.complete(PROMPTS[:6], GREEDY)]


def test_a_failing_batch_fails_each_of_its_waiters_cleanly_and_the_gateway_serves_on(teacher_a):
    counting = Counting(teacher_a)
    prompts = PROMPTS[:5] + [PROMPTS[5] + POISON] + PROMPTS[6:8]
    with live_server(create_app(lambda: counting, "teacher-a", batch_window=0.3, max_batch=16)) as url:
        outcomes = asyncio.run(ask_all(url, prompts))
        after = asyncio.run(ask_all(url, PROMPTS[:1]))
    failed_batches = [batch for batch in counting.batches if any(POISON in p for p in batch)]
    assert len(failed_batches) == 1 and len(failed_batches[0]) > 1  # the failure reached more than its own prompt
    for prompt, outcome in zip(prompts, outcomes):
        if prompt in failed_batches[0]:
            assert isinstance(outcome, openai.InternalServerError), outcome
            assert outcome.body["type"] == "server_error" and "failed on this batch" not in outcome.message
        else:
            assert outcome == teacher_a.complete([prompt], GREEDY)[0].text
    assert after == [teacher_a.complete(PROMPTS[:1], GREEDY)[0].text]


def test_only_consecutive_requests_with_equal_unseeded_sampling_share_a_batch(teacher_a):
    """Arrival order is kept, a request that samples otherwise closes the batch before it, and a seeded one goes
    alone, so its draw is what the same seed gives when asked alone."""
    counting = Counting(teacher_a)
    short, seeded, hot = Sampling(temperature=0, max_new_tokens=8), Sampling(seed=3, max_new_tokens=8), \
        Sampling(temperature=1.0, max_new_tokens=8)
    plan = [(PROMPTS[0], short), (PROMPTS[1], short), (PROMPTS[2], seeded), (PROMPTS[3], short),
            (PROMPTS[4], hot), (PROMPTS[5], hot)]
    batcher = Batcher(window=0.3, max_batch=16).start()
    answers: dict[int, str] = {}

    def send(i, prompt, sampling):
        answers[i] = batcher.complete(counting, prompt, sampling, Caller("tester")).text

    threads = [threading.Thread(target=send, args=(i, *step)) for i, step in enumerate(plan)]
    for thread in threads:
        thread.start()
        time.sleep(0.02)  # so that the arrival order is the plan's
    for thread in threads:
        thread.join(timeout=30)
    batcher.stop()
    assert counting.batches == [PROMPTS[0:2], PROMPTS[2:3], PROMPTS[3:4], PROMPTS[4:6]]
    assert counting.samplings == [short, seeded, short, hot]
    assert answers[2] == teacher_a.complete([PROMPTS[2]], seeded)[0].text
    assert [answers[i] for i in (0, 1, 3)] == [teacher_a.complete([PROMPTS[i]], short)[0].text for i in (0, 1, 3)]


def test_a_stopped_batcher_refuses_rather_than_leaving_a_caller_waiting(teacher_a):
    batcher = Batcher()
    with pytest.raises(RuntimeError, match="not running"):
        batcher.complete(teacher_a, PROMPTS[0], GREEDY, Caller("tester"))


def test_batching_benchmark_smoke(teacher_a):
    """Smoke test: the benchmark's gateway and clients still run and get each prompt's own answer. Not timed."""
    from eval.benchmarks.gateway_batching import ask

    with live_server(create_app(lambda: teacher_a, "teacher", max_batch=4)) as url:
        texts, _ = asyncio.run(ask(url + "/v1", PROMPTS[:6], clients=3))
    assert texts == [teacher_a.complete([p], GREEDY)[0].text for p in PROMPTS[:6]]


class Gated(Counting):
    """`Counting`, holding each call until `gate` opens; `entered` is set once a call is waiting on it."""

    def __init__(self, teacher):
        super().__init__(teacher)
        self.gate, self.entered = threading.Event(), threading.Event()

    def complete(self, prompts, sampling=Sampling(), callers=None):
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().complete(prompts, sampling, callers)


def _post(url: str, prompt: str, timeout: float = 30):
    import httpx

    return httpx.post(url + "/v1/completions", timeout=timeout,
                      json={"model": "teacher-a", "prompt": prompt, "max_tokens": 4})


def _queued(app) -> int:
    return len(app.state.batcher.pending)


def _until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_past_its_queue_the_gateway_answers_503_with_retry_after_and_serves_what_it_queued(teacher_a):
    gated = Gated(teacher_a)
    app = create_app(lambda: gated, "teacher-a", max_batch=1, max_queue=2)
    with live_server(app) as url:
        replies = {}
        first = threading.Thread(target=lambda: replies.setdefault(0, _post(url, PROMPTS[0])))
        first.start()
        _until(gated.entered.is_set)  # the teacher is busy with the first
        queued = [threading.Thread(target=lambda i=i: replies.setdefault(i, _post(url, PROMPTS[i]))) for i in (1, 2)]
        for thread in queued:
            thread.start()
        _until(lambda: _queued(app) == 2)
        turned_away = _post(url, PROMPTS[3])
        gated.gate.set()
        for thread in [first, *queued]:
            thread.join()
    assert turned_away.status_code == 503 and turned_away.headers["retry-after"] == "1"
    assert turned_away.json()["error"]["code"] == "overloaded"
    assert [replies[i].status_code for i in range(3)] == [200] * 3
    assert PROMPTS[3] not in sum(gated.batches, [])


def test_a_client_that_goes_away_while_queued_is_never_generated(teacher_a):
    import httpx

    gated = Gated(teacher_a)
    app = create_app(lambda: gated, "teacher-a", max_batch=1)
    with live_server(app) as url:
        first = threading.Thread(target=lambda: _post(url, PROMPTS[0]))
        first.start()
        _until(gated.entered.is_set)
        with pytest.raises(httpx.ReadTimeout):
            _post(url, PROMPTS[1], timeout=0.5)  # gives up while queued behind the first
        _until(lambda: app.state.batcher.pending[0].answer.cancelled())  # the gateway noticed it left
        gated.gate.set()
        first.join()
        assert _post(url, PROMPTS[2]).status_code == 200  # and serves on
    assert sum(gated.batches, []) == [PROMPTS[0], PROMPTS[2]]
