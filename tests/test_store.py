"""The gateway's stores (issue 13): keys kept only as hashes, and an audit log whose acknowledged rows survive
threads, new processes and kill -9 (acknowledged only once committed), read back by `distill-guard detect`. Real SQLite files, a real PostgreSQL
server (tests/conftest.py), real processes. Tests taking `store_url` run once for each database."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psycopg
import pytest
from typer.testing import CliRunner

from conftest import live_server
from eval.reference.world import reference_task
from eval.traffic import simulate
from guard.cli import app
from guard.gateway.app import create_app
from guard.gateway.store import AuditRecord, PostgresStore, SQLiteStore, Store, open_store, shown_url

CLI = [sys.executable, "-m", "guard.cli"]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return request.getfixturevalue("postgres_url")  # the server starts only when a test needs it


def db_bytes(path: Path) -> bytes:
    """Everything SQLite wrote for this database: the file and its write-ahead log."""
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def stored(store: Store) -> bytes:
    """What the store wrote: SQLite's bytes on disk; in PostgreSQL, every row of its tables as text."""
    if isinstance(store, SQLiteStore):
        return db_bytes(store.path)
    return "\n".join(row["text"] for table in ("keys", "audit")
                     for row in store._read(f"SELECT {table}::text AS text FROM {table}")).encode()


def record(n: int, account: str = "alice", time: float = 1_767_225_600.0, **extra) -> AuditRecord:
    return AuditRecord(request_id=f"req-{n}", account=account, time=time + n, prompt=f"question {n}",
                       response=f"answer {n}", prompt_tokens=3, completion_tokens=5,
                       decisions={"monitor": {"action": "allow"}}, latency=0.01, **extra)


def test_a_key_is_stored_only_as_its_hash(store_url):
    with open_store(store_url) as store:
        key = store.create_key("alice", rpm=5, tpm=1000, policy="answer-only")
        assert store.resolve(key) == store.list_keys()[0]
        written = stored(store)
    assert key.startswith("dg-") and len(key) > 40
    assert b"alice" in written  # the bytes searched are the ones written
    assert key.encode() not in written and key.removeprefix("dg-")[:16].encode() not in written


def test_resolve_accepts_the_key_and_nothing_near_it_and_never_a_revoked_key(store_url):
    with open_store(store_url) as store:
        key = store.create_key("alice", rpm=5, tpm=1000, policy="answer-only")
        other = store.create_key("bob")
        account = store.resolve(key)
        assert (account.name, account.rpm, account.tpm, account.policy, account.revoked) == \
            ("alice", 5, 1000, "answer-only", False)
        assert store.resolve(other).name == "bob"
        last = "A" if key[-1] != "A" else "B"
        for wrong in (key[:-1] + last, key[:-1], key + "A", key.upper(), "", "dg-"):
            assert store.resolve(wrong) is None, wrong
        assert store.revoke(account.key_id) and not store.revoke(account.key_id) and not store.revoke("nope")
        assert store.resolve(key) is None and store.resolve(other).name == "bob"
        assert [a.revoked for a in store.list_keys()] == [True, False]


def test_resolve_compares_the_whole_digest_not_only_the_indexed_prefix(store_url):
    with open_store(store_url) as store:
        key = store.create_key("alice")
        # a stored digest that shares the key's lookup prefix, and only that
        digest = store._read("SELECT digest FROM keys")[0]["digest"]
        store._write("UPDATE keys SET digest = ?", [(digest[:-1] + ("0" if digest[-1] != "0" else "1"),)])
    with open_store(store_url) as store:
        assert store.resolve(key) is None


def test_a_policy_is_checked_when_its_key_is_created(store_url):
    with open_store(store_url) as store:
        with pytest.raises(ValueError, match="unknown redaction policy 'answers-only'"):
            store.create_key("alice", policy="answers-only")
        with pytest.raises(ValueError, match="rpm must be a positive"):
            store.create_key("alice", rpm=0)
        assert store.list_keys() == []


def test_store_urls(tmp_path, postgres_url):
    with pytest.raises(ValueError, match="not a store URL"):
        open_store(str(tmp_path / "store.db"))
    with open_store(f"sqlite:///{tmp_path}/a/store.db") as store:
        assert store.path == tmp_path / "a" / "store.db"
        assert store._read("PRAGMA journal_mode")[0][0] == "wal"
        # the writer's connection, where commits are made (the reader's setting decides nothing)
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with open_store(postgres_url) as store:
        assert isinstance(store, PostgresStore)
    with pytest.raises(psycopg.OperationalError, match='database "no_such_db_.*" does not exist'):
        open_store(postgres_url.replace("/test_", "/no_such_db_", 1))


def test_postgresql_commits_synchronously_even_where_the_database_says_otherwise(postgres_url):
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute(f"ALTER DATABASE {db.info.dbname} SET synchronous_commit = off")  # a COMMIT could be lost
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SHOW synchronous_commit").fetchone()[0] == "off"  # the setting bites
    with open_store(postgres_url) as store:
        store.log(record(0))
        assert store._read("SHOW synchronous_commit")[0]["synchronous_commit"] == "on"


def test_audit_rows_from_many_threads_are_all_read_by_a_new_process(store_url):
    threads, each = 8, 40
    store = open_store(store_url)

    def write(t: int) -> None:
        for n in range(each):
            store.log(record(t * each + n, account=f"account-{t}"))

    workers = [threading.Thread(target=write, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    # the writer stays open: a reader in another process sees what was committed, not what a close flushed
    read = subprocess.run([sys.executable, "-c", "import sys, json; from guard.gateway.store import open_store; "
                           "print(json.dumps([r.request_id for r in open_store(sys.argv[1]).records()]))",
                           store_url], capture_output=True, text=True, timeout=120, check=True)
    ids = json.loads(read.stdout)
    assert sorted(ids) == sorted(f"req-{n}" for n in range(threads * each))
    with open_store(store_url) as reader:
        first = reader.records()[0]
    assert first.decisions == {"monitor": {"action": "allow"}} and first.response.startswith("answer")
    store.close()


WRITER = """
import sys
from guard.gateway.store import AuditRecord, SQLiteStore
store = SQLiteStore(sys.argv[1])
for n in range(100_000):
    store.log(AuditRecord(request_id=f"req-{n}", account="alice", time=float(n), prompt=f"question {n}"))
    print(n + 1, flush=True)  # acknowledged: the row's write returned
"""


def test_a_row_is_acknowledged_only_once_committed_so_kill_9_loses_none(tmp_path):
    """Acknowledge-after-commit, not durability: the OS page cache outlives a killed process, so this passes with
    synchronous=OFF too. That each commit reaches the disk first is test_store_sqlite.py's strace test."""
    path = tmp_path / "store.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    for line in writer.stdout:
        if int(line) >= 137:
            break
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    # every acknowledgement the writer printed counts, also those still in the pipe when it died
    acknowledged = max([int(line)] + [int(n) for n in writer.stdout.read().split()])
    with SQLiteStore(path) as store:
        ids = [r.request_id for r in store.records()]
    assert len(ids) >= acknowledged
    assert ids == [f"req-{n}" for n in range(len(ids))]  # each once, none missing before the last


def test_a_repeated_request_id_is_refused_and_a_group_is_all_or_nothing(store_url):
    with open_store(store_url) as store:
        store.log(record(0))
        with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
            store.log(record(1), record(0))
        assert [r.request_id for r in store.records()] == ["req-0"]


def test_hashed_text_keeps_no_prompt_or_response_but_still_feeds_detect(store_url):
    with open_store(store_url, keep_text=False) as store:
        store.log(record(0, ip="10.0.0.1"), record(1))
        rows = store.records()
        events, skipped = store.read_events()
        written = stored(store)
    assert b"10.0.0.1" in written and b"question 0" not in written and b"answer 0" not in written
    assert rows[0].prompt.startswith("sha256:") and rows[0].response.startswith("sha256:")
    assert rows[0].prompt != rows[1].prompt and skipped == 0
    assert (events[0].client, events[0].ip, events[0].prompt_tokens, events[0].response_tokens) == \
        ("alice", "10.0.0.1", 3, 5)


def test_purge_deletes_only_rows_older_than_the_retention(store_url):
    with open_store(store_url) as store:
        store.log(*(record(n, time=0.0) for n in range(10)))  # row n logged at time n
        assert store.purge(older_than_seconds=4, now=10.0) == 6
        assert [r.request_id for r in store.records()] == [f"req-{n}" for n in range(6, 10)]


def test_records_come_in_time_order_from_since_and_up_to_limit(store_url):
    with open_store(store_url) as store:
        store.log(*(record(n, time=0.0) for n in (5, 1, 4, 2, 3)))  # logged out of time order
        assert [r.request_id for r in store.records()] == [f"req-{n}" for n in range(1, 6)]
        assert [r.request_id for r in store.records(since=2.0, limit=2)] == ["req-2", "req-3"]


@pytest.mark.slow
def test_keys_cli_round_trip(tmp_path):
    url = f"sqlite:///{tmp_path}/store.db"
    created = subprocess.run(CLI + ["keys", "create", "--store", url, "--account", "alice", "--rpm", "5",
                                    "--policy", "answer-only"], capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("dg-") and "\n" not in key
    listed = subprocess.run(CLI + ["keys", "list", "--store", url], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})
    with open_store(url) as store:
        key_id = store.resolve(key).key_id
    assert "alice" in listed.stdout and "answer-only" in listed.stdout and key_id in listed.stdout
    assert key not in listed.stdout + listed.stderr and key[3:12] not in listed.stdout
    revoked = subprocess.run(CLI + ["keys", "revoke", "--store", url, key_id], capture_output=True, text=True,
                             timeout=120)
    assert revoked.returncode == 0, revoked.stderr
    with open_store(url) as store:
        assert store.resolve(key) is None
    misspelt = subprocess.run(CLI + ["keys", "create", "--store", url, "--account", "bob", "--policy", "nope"],
                              capture_output=True, text=True, timeout=120)
    assert misspelt.returncode != 0 and "unknown redaction policy" in misspelt.stderr and not misspelt.stdout


def log_traffic(path: Path, population: dict, seed: int) -> dict[str, str]:
    events, kinds = simulate(population, days=1, seed=seed, attack_budget=900)
    with SQLiteStore(path) as store:
        store.log(*(AuditRecord(request_id=f"{seed}-{n}", account=e.client, time=e.time, prompt=e.prompt,
                                prompt_tokens=e.prompt_tokens, completion_tokens=e.response_tokens,
                                endpoint=e.endpoint, ip=e.ip, payment=e.payment) for n, e in enumerate(events)))
    return kinds


@pytest.mark.slow
def test_detect_reads_the_audit_log(tmp_path):
    kinds = log_traffic(tmp_path / "audit.db", {"human": 30, "naive": 1}, seed=0)
    report = tmp_path / "report.json"
    done = subprocess.run(CLI + ["detect", "--log", f"sqlite:///{tmp_path}/audit.db", "--lab", "--out", str(report)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    verdicts = json.loads(report.read_text())["clients"]
    assert set(verdicts) == set(kinds)
    assert [c for c, v in verdicts.items() if v["flagged"]] == [c for c, k in kinds.items() if k == "naive"]
    log_traffic(tmp_path / "benign.db", {"human": 60, "power": 20, "batch": 20}, seed=1)  # a provider's own users
    fitted = subprocess.run(CLI + ["detect", "--log", f"sqlite:///{tmp_path}/audit.db", "--benign",
                                   f"sqlite:///{tmp_path}/benign.db", "--fpr", "0.05", "--out", str(report)],
                            capture_output=True, text=True, timeout=600)
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    verdicts = json.loads(report.read_text())["clients"]
    assert [c for c, v in verdicts.items() if v["flagged"]] == [c for c, k in kinds.items() if k == "naive"]


def test_the_gateway_logs_to_postgresql_and_detect_reads_it_there(teacher_a, postgres_url, tmp_path):
    cli = CliRunner()
    keys = {account: cli.invoke(app, ["keys", "create", "--store", postgres_url, "--account", account]).stdout.strip()
            for account in ("alice", "bob")}
    asks = {"alice": 25, "bob": 3}  # 25: the detector's first checkpoint, so alice is judged
    prompts = [i.prompt for i in reference_task().query_pool[:sum(asks.values())]]
    calls = [("alice", p) for p in prompts[:asks["alice"]]] + [("bob", p) for p in prompts[asks["alice"]:]]
    with open_store(postgres_url) as store, live_server(create_app(lambda: teacher_a, "teacher-a", store=store)) as url:
        def ask(call: tuple[str, str]) -> str:
            client = openai.OpenAI(base_url=url + "/v1", api_key=keys[call[0]], max_retries=0)
            return client.chat.completions.create(model="teacher-a", max_tokens=2, seed=0, messages=[
                {"role": "user", "content": call[1]}]).id

        with ThreadPoolExecutor(8) as pool:  # at once: the gateway's threads share the store's connections
            answered = list(pool.map(ask, calls))
    assert len(set(answered)) == len(calls)
    log_traffic(tmp_path / "benign.db", {"human": 60, "power": 20, "batch": 20}, seed=1)
    report = tmp_path / "report.json"
    done = cli.invoke(app, ["detect", "--log", postgres_url, "--benign", f"sqlite:///{tmp_path}/benign.db",
                            "--fpr", "0.05", "--out", str(report)])
    assert done.exit_code == 0, done.output
    verdicts = json.loads(report.read_text())["clients"]
    assert {client: v["requests"] for client, v in verdicts.items()} == asks
    assert verdicts["alice"]["judged"] and not verdicts["bob"]["judged"]


def test_a_password_in_a_store_url_is_never_shown():
    assert shown_url("postgresql://gw:s3cret@db.internal:5432/audit") == "postgresql://gw:***@db.internal:5432/audit"
    assert shown_url("postgresql://gw@db.internal/audit") == "postgresql://gw@db.internal/audit"
    assert shown_url("sqlite:///gateway.db") == "sqlite:///gateway.db"


def test_a_group_commit_fails_only_the_call_whose_rows_fail(tmp_path):
    store = SQLiteStore(tmp_path / "store.db")
    store.log(record(0))
    commit, first_held, release, batches = store._audit.write, threading.Event(), threading.Event(), []

    def held(rows):  # the first commit waits on the disk, so the calls behind it queue up and share the next one
        first_held.set()
        release.wait(10)
        batches.append(len(rows))
        return commit(rows)

    store._audit.write = held
    errors = {}

    def log(n: int) -> None:
        try:
            store.log(record(n))
        except sqlite3.IntegrityError as error:
            errors[n] = error

    first = threading.Thread(target=log, args=(1,))
    first.start()
    assert first_held.wait(10)
    queued = [threading.Thread(target=log, args=(n,)) for n in (0, 2, 3)]  # row 0's id is taken: only it fails
    for t in queued:
        t.start()
    while len(store._audit._waiting) < len(queued):
        threading.Event().wait(0.01)
    release.set()
    for t in [first, *queued]:
        t.join(10)
    assert list(errors) == [0] and "UNIQUE" in str(errors[0])
    assert sorted(r.request_id for r in store.records()) == ["req-0", "req-1", "req-2", "req-3"]
    assert batches[:2] == [1, 3]  # the three queued calls went to disk together, then each alone
    store.close()
