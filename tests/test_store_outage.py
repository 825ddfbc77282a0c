"""The audit store down under load (issue 26, fault 6): queued requests get a 503 at once, not one pool timeout
after another. A real PostgreSQL server behind a real TCP proxy that the test cuts, as a database that went
down (or a network that lost it) looks to the gateway; real HTTP into the gateway."""

import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from conftest import live_server
from guard.gateway.app import create_app
from guard.gateway.group_commit import CommitTimeout
from guard.gateway.store import AuditRecord, PostgresStore, SQLiteStore


class Proxy:
    """A TCP proxy in front of a PostgreSQL server. `cut()` closes every connection through it and drops each new
    one as it arrives, as a server that went down does. `stall()` keeps every connection open and passes nothing
    on, either way, as a network that lost the server does (where nothing tells the client for minutes).
    `restore()` closes the stalled connections and lets new ones through again."""

    def __init__(self, url: str):
        info = conninfo_to_dict(url)
        host, port = info.get("host") or "localhost", int(info.get("port") or 5432)
        # pgserver's servers listen on a Unix socket (host is its folder); others on TCP
        self.target = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/") else \
            (socket.AF_INET, (host, port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = make_conninfo(url, host="127.0.0.1", port=str(self.listener.getsockname()[1]))
        self.down = self.stalled = False
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.lock:
                if self.down:
                    client.close()
                    continue
                if self.stalled:
                    self.open.append(client)  # left waiting for a server that never answers
                    continue
                server = socket.socket(self.target[0])
                server.connect(self.target[1])
                self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.stalled:  # stalled: lost on the way
                    sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            end.close()

    def cut(self) -> None:
        with self.lock:
            self.down = True
            for end in self.open:
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()
            self.open = []

    def stall(self) -> None:
        self.stalled = True

    def restore(self) -> None:
        if self.stalled:
            self.cut()  # what a stall left half-sent cannot go on
        with self.lock:
            self.down = self.stalled = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def proxy(postgres_url):
    proxy = Proxy(postgres_url)
    yield proxy
    proxy.close()


ASK = {"model": "teacher-a", "prompt": "hello", "max_tokens": 1}


@pytest.mark.parametrize("outage", ["cut", "stall"])
def test_forty_requests_queued_during_a_postgres_outage_all_get_503_within_5_s(teacher_a, proxy, outage):
    """Down (connections refused): the pool's short timeout fails each batch, and every request queued behind
    it, at once. Stalled (nothing answers): the writer waits on its connection, and each request gives up at
    its deadline."""
    store = PostgresStore(proxy.url, commit_deadline=2.0)
    key = store.create_key("alice")
    headers = {"authorization": f"Bearer {key}"}
    app = create_app(lambda: teacher_a, "teacher-a", store=store, key_cache_seconds=600)  # the key stays known
    try:
        with live_server(app) as url:
            def ask(_) -> int | str:
                try:
                    return httpx.post(f"{url}/v1/completions", json=ASK, headers=headers, timeout=15).status_code
                except httpx.TimeoutException:
                    return "no answer in 15 s"

            assert ask(0) == 200  # served, its row logged, the key cached, the pool's connection open
            getattr(proxy, outage)()
            start = time.monotonic()
            with ThreadPoolExecutor(40) as clients:
                statuses = list(clients.map(ask, range(40)))
            took = time.monotonic() - start
            proxy.restore()  # the database is back: the gateway serves again once its pool reconnects
            deadline = time.monotonic() + 30
            while (status := ask(0)) != 200 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert status == 200
    finally:
        proxy.restore()  # (before the store closes: it commits what still waits)
        store.close()
    print(f"\n40 requests during the outage answered in {took:.1f} s: {sorted(map(str, statuses))[:3]} ...")
    assert statuses == [503] * 40 and took < 5


def test_a_log_call_gives_up_at_its_deadline_while_another_process_holds_the_database(tmp_path):
    """A writer that cannot commit (here: another connection holds SQLite's write lock, for longer than the busy
    timeout of 10 s) costs a request its deadline, not the whole wait."""
    store = SQLiteStore(tmp_path / "store.db", commit_deadline=0.5)
    other = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a long retention purge from the command line
    start = time.monotonic()
    with pytest.raises(CommitTimeout):
        store.log(AuditRecord("req-0", "alice", 0.0, "question"))
    assert time.monotonic() - start < 2
    other.execute("ROLLBACK")
    store.log(AuditRecord("req-1", "alice", 0.0, "question"))  # the writer goes on once the lock is free
    assert "req-1" in [r.request_id for r in store.records()]
    store.close()
