"""The audit log keeps every answered request: a client finds its request in the log by the id it received, and
`kill -9` under load loses no request whose response a client received, and logs none twice. What the kills
show is that a response waits for its row's commit; that a commit reaches the disk (a power cut, which the
page cache does not outlive) is test_store_sqlite.py's strace test. The real gateway in a subprocess, real
HTTP, the real `openai` SDK, real SQLite and PostgreSQL."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from conftest import free_port, live_server
from guard.gateway.app import create_app
from guard.gateway.store import PostgresStore, SQLiteStore, text_digest

ROOT = Path(__file__).resolve().parents[1]


def test_the_audit_row_carries_the_id_the_client_receives(teacher_a, tmp_path):
    store = SQLiteStore(tmp_path / "gateway.db")
    key = store.create_key("alice")
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="teacher-a", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
        chat = raw.parse()
        assert raw.headers["x-request-id"] == chat.id and chat.id.startswith("chatcmpl-")
        raw = client.chat.completions.with_raw_response.create(
            model="teacher-a", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True)
        streamed = {chunk.id for chunk in raw.parse()}
        assert streamed == {raw.headers["x-request-id"]}
        raw = client.completions.with_raw_response.create(model="teacher-a", prompt=["one", "two"], max_tokens=4)
        batch = raw.parse()
        assert raw.headers["x-request-id"] == batch.id and batch.id.startswith("cmpl-")
    ids = [r.request_id for r in store.records()]
    assert sorted(ids) == sorted([chat.id, *streamed, f"{batch.id}-0", f"{batch.id}-1"])


@contextmanager
def gateway(store: str, log: Path, *options: str):
    """`distill-guard gateway` on `store` (a URL) on a loopback port, as an operator starts it; yields (process,
    base URL)."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "guard.cli", "gateway", "--teacher", "reference", "--store", store,
             "--port", str(port), *options], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the gateway did not start"
            try:
                if httpx.get(url + "/healthz").json()["status"] == "ok":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield process, url
    finally:
        process.kill()
        process.wait()


class Load:
    """Client threads sending a mix of requests until the gateway dies. A request is acknowledged once its
    response (a stream: its first chunk) arrived. Each prompt is a marker of its own (`marker`); `expected`
    maps the audit row id each acknowledgement promises to the prompt it answered, `sent` holds every prompt
    sent."""

    def __init__(self, url: str, key: str, kill_after: int, kill: Callable[[], None]):
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
        self.kill_after, self.kill = kill_after, kill
        self.expected: dict[str, str] = {}
        self.sent: list[str] = []
        self.errors: list[Exception] = []
        self.lock = threading.Lock()
        self.dead = threading.Event()

    def acknowledged(self, **answered: str) -> None:
        """`answered`: each audit row id the response promises, and its prompt."""
        with self.lock:
            assert not answered.keys() & self.expected.keys(), f"an id answered twice: {answered}"
            self.expected.update(answered)
            if len(self.expected) >= self.kill_after and not self.dead.is_set():
                self.kill()  # the moment a response arrives: a row written after it would now be lost
                self.dead.set()

    def one(self, n: int) -> None:
        prompts = [f"q {n}.", f"r {n}."] if n % 4 == 3 else [f"question {n}."]
        messages = [{"role": "user", "content": prompts[0]}]
        with self.lock:
            self.sent += prompts
        if n % 4 == 0:
            reply = self.client.chat.completions.create(model="teacher-a", messages=messages, max_tokens=6)
            self.acknowledged(**{reply.id: prompts[0]})
        elif n % 4 == 1:
            for i, chunk in enumerate(self.client.chat.completions.create(model="teacher-a", messages=messages,
                                                                          max_tokens=6, stream=True)):
                if i == 0:
                    self.acknowledged(**{chunk.id: prompts[0]})
        elif n % 4 == 2:
            reply = self.client.completions.create(model="teacher-a", prompt=prompts[0], max_tokens=6)
            self.acknowledged(**{reply.id: prompts[0]})
        else:
            batch = self.client.completions.create(model="teacher-a", prompt=prompts, max_tokens=6)
            self.acknowledged(**{f"{batch.id}-{i}": prompt for i, prompt in enumerate(prompts)})

    def worker(self, first: int, step: int) -> None:
        n = first
        while not self.dead.is_set():
            try:
                self.one(n)
            except openai.APIConnectionError:
                if not self.dead.is_set():
                    raise
            except Exception as e:  # noqa: BLE001 - surfaced by the test, not swallowed
                self.errors.append(e)
                return
            n += step


def marker(prompt: str) -> str:
    """The marker `Load` sent that an audit row's prompt holds (a chat row may hold the rendered conversation)."""
    found = re.findall(r"\b(?:question|q|r) \d+\.", prompt)
    assert len(found) == 1, prompt
    return found[0]


def check_log(rows: list, *loads: Load) -> None:
    """Every acknowledged row is in the log with the prompt it answered, and no prompt is logged twice, nor one
    no client sent. (Not "no request id twice": the schema makes ids unique, so that could never fail.)"""
    logged = {r.request_id: marker(r.prompt) for r in rows}
    expected = {row_id: prompt for load in loads for row_id, prompt in load.expected.items()}
    assert {row_id: logged.get(row_id) for row_id in expected} == expected
    twice = [prompt for prompt, times in Counter(logged.values()).items() if times > 1]
    assert twice == [] and set(logged.values()) <= {prompt for load in loads for prompt in load.sent}


@pytest.mark.slow
def test_responses_wait_for_their_audit_rows_so_kill_9_under_load_loses_none_and_logs_none_twice(tmp_path):
    db, log = tmp_path / "gateway.db", tmp_path / "gateway.log"
    with SQLiteStore(db) as store:
        key = store.create_key("alice")
    with gateway(f"sqlite:///{db}", log) as (process, url):
        load = Load(url, key, kill_after=40, kill=lambda: os.kill(process.pid, signal.SIGKILL))
        threads = [threading.Thread(target=load.worker, args=(i, 4)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not load.errors, load.errors
        assert load.dead.is_set() and process.wait(timeout=10) == -signal.SIGKILL
    with SQLiteStore(db) as store:  # after the restart: a fresh store on the same file
        rows = store.records()
    ids = [r.request_id for r in rows]
    print(f"\nacknowledged rows {len(load.expected)}, rows in the log {len(ids)}, rows the requests sent could "
          f"write {len(load.sent)}")
    assert len(load.expected) >= 40
    check_log(rows, load)
    with gateway(f"sqlite:///{db}", log, "--no-log-text") as (_, url):  # restarted on the same store, now logging only hashes
        after = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).completions.create(
            model="teacher-a", prompt="question after", max_tokens=4)
    with SQLiteStore(db) as store:
        rows = store.records()
    assert [r.request_id for r in rows] == ids + [after.id]
    assert rows[-1].prompt == text_digest("question after") and rows[-1].response == text_digest(after.choices[0].text)


@pytest.mark.slow
def test_responses_wait_for_their_audit_rows_so_kill_9_of_a_replica_loses_nothing_from_the_shared_postgres_log(
        tmp_path, postgres_url, redis_server_url):
    """Two replicas on one PostgreSQL store and one Redis, clients on both; one replica is killed with SIGKILL
    the moment its 40th acknowledgement arrives. Every request either replica acknowledged is in the log, none
    twice, and the survivor goes on serving the same key (no sticky sessions)."""
    with PostgresStore(postgres_url) as store:
        key = store.create_key("alice", rpm=100_000)
    options = ("--redis", redis_server_url)
    with gateway(postgres_url, tmp_path / "a.log", *options) as (doomed, url_a), \
            gateway(postgres_url, tmp_path / "b.log", *options) as (_, url_b):
        killed = Load(url_a, key, kill_after=40, kill=lambda: os.kill(doomed.pid, signal.SIGKILL))
        survivor = Load(url_b, key, kill_after=10**9, kill=lambda: None)
        survivor.dead = killed.dead  # the survivor's clients stop when the other replica dies
        threads = [threading.Thread(target=load.worker, args=(i + first, 8))
                   for load, first in ((killed, 0), (survivor, 4)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not killed.errors and not survivor.errors, killed.errors + survivor.errors
        assert doomed.wait(timeout=10) == -signal.SIGKILL
        survivor.sent.append("question 999999.")  # one more request, answered by the survivor after the kill
        after = openai.OpenAI(base_url=url_b + "/v1", api_key=key, max_retries=0).completions.create(
            model="teacher-a", prompt="question 999999.", max_tokens=4)
        survivor.expected[after.id] = "question 999999."
    with PostgresStore(postgres_url) as store:
        rows = store.records()
    print(f"\nacknowledged by the killed replica {len(killed.expected)}, by the survivor {len(survivor.expected)}; "
          f"rows in the log {len(rows)}, rows the requests sent could write {len(killed.sent) + len(survivor.sent)}")
    assert len(killed.expected) >= 40 and survivor.expected
    check_log(rows, killed, survivor)
