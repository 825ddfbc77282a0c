"""The gateway's stores: API keys with their accounts, and the audit log, in one database named by a URL.

- SQLite, the embedded default (`sqlite:///PATH`, relative; `sqlite:////PATH`, absolute): WAL mode with
  `synchronous=FULL`. One connection behind a lock writes (SQLite serialises writers anyway); another reads.
- PostgreSQL, at scale (`postgresql://USER@HOST/DB`; a password from $PGPASSWORD or ~/.pgpass keeps it out
  of command lines): a pool of connections, one per thread at a time, with `synchronous_commit=on`, so
  several gateway replicas can share one store.

Either way a write returns only after its transaction is committed durably, so a response the gateway
acknowledges after `log` returns cannot be lost to a crash. Audit rows logged at the same time share one
transaction (`GroupCommit`), so requests do not queue behind each other's fsyncs; with the database down, a
`log` call fails within its deadline (`UNAVAILABLE`: the gateway answers 503). Each audit row gets a `seq` in
commit order, by which readers page (`Store.page`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from typing import Iterator, Literal

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from detectors.events import Event, events_by_client, events_from_rows
from guard.gateway.group_commit import CommitTimeout, GroupCommit
from guard.redaction import parse_policy

UNAVAILABLE = (sqlite3.OperationalError, psycopg.OperationalError, PoolTimeout, CommitTimeout)  # the database
INTEGRITY = (sqlite3.IntegrityError, psycopg.IntegrityError)  # a row's own fault (a repeated id), not the database's
COMMIT_DEADLINE = 5.0  # seconds a request waits for its audit row before it is answered 503
PURGE_CHUNK = 5_000  # rows a retention purge deletes per transaction
POOL_TIMEOUT = 1.0  # seconds PostgreSQL's pool waits for a connection: a down server fails fast, not in 30 s
KEY_PREFIX = "dg-"
MAX_LIMIT = 2**63 - 1  # the largest rpm or tpm both databases store (a signed 64-bit integer)
LOOKUP_CHARS = 16  # of the digest's hex, indexed: enough to make two keys' lookups collide almost never

# One schema for both databases; only the column that keeps the audit log's commit order differs ({seq}): it
# grows in commit order and is never reused (SQLite's AUTOINCREMENT), so that readers page by it (`Store.page`).
SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, lookup TEXT NOT NULL, digest TEXT NOT NULL, account TEXT NOT NULL,
    rpm INTEGER, tpm INTEGER, policy TEXT, created DOUBLE PRECISION NOT NULL, revoked DOUBLE PRECISION);
CREATE INDEX IF NOT EXISTS keys_by_lookup ON keys (lookup);
CREATE TABLE IF NOT EXISTS audit (
    {seq}, request_id TEXT NOT NULL UNIQUE, account TEXT NOT NULL, time DOUBLE PRECISION NOT NULL, ip TEXT,
    payment TEXT, endpoint TEXT NOT NULL, prompt TEXT NOT NULL, response TEXT, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, decisions TEXT NOT NULL, latency DOUBLE PRECISION,
    status INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time);
"""
AUDIT_COLUMNS = ("request_id, account, time, ip, payment, endpoint, prompt, response, prompt_tokens, "
                 "completion_tokens, decisions, latency, status")
# the audit columns as events' fields (detectors.events.event_from_row reads rows keyed so)
EVENT_COLUMNS = ("account AS client, time, prompt, prompt_tokens, completion_tokens AS response_tokens, endpoint, "
                 "ip, payment, response")
EVENT_KEYS = ("client", "time", "prompt", "prompt_tokens", "response_tokens", "endpoint", "ip", "payment", "response")
INSERT_AUDIT = f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES ({', '.join('?' * 13)})"


@dataclass(frozen=True)
class Account:
    """What an API key resolves to: the account every defence acts for, and its limits and policy."""

    name: str
    key_id: str
    rpm: int | None = None
    tpm: int | None = None
    policy: str | None = None  # a redaction policy name (guard.redaction.parse_policy); None: the gateway's
    revoked: bool = False


@dataclass
class AuditRecord:
    """One request as the audit log keeps it. `decisions` holds each defence's decision, e.g.
    {"monitor": {"action": "throttle", "reason": ...}, "redaction": "answer-only"}."""

    request_id: str
    account: str
    time: float
    prompt: str
    response: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decisions: dict = field(default_factory=dict)
    latency: float | None = None  # seconds
    status: int = 200
    ip: str | None = None
    payment: str | None = None
    endpoint: str = "chat"
    seq: int | None = None  # its place in the log's commit order, once written (`Store.page`)


def _digest(key: str) -> str:
    # A plain SHA-256 is enough here, unlike for passwords: the keys are 256 random bits, so there is no
    # dictionary to try and nothing a slow, salted hash would protect; it also lets a key be found by index.
    return hashlib.sha256(key.encode()).hexdigest()


def text_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _event_fields(row) -> dict:
    """An audit row as an event's fields. A response logged as its digest (`keep_text=False`) is no text the
    detectors can read: the event has none (the online monitor read the text before it was hashed)."""
    fields = {k: row[k] for k in EVENT_KEYS}
    if fields["response"] and fields["response"].startswith("sha256:") and len(fields["response"]) == 71:
        fields["response"] = None
    return fields


class Store:
    """Keys and audit log in one SQL database; `SQLiteStore` and `PostgresStore` supply the connection.
    `keep_text=False` logs only the SHA-256 of each prompt and response (repeats stay visible to `detect`;
    the text's content does not). SQL here is written with `?` placeholders."""

    keep_text: bool
    name: str  # the database, as messages name it: never with a password

    def _write(self, sql: str, rows: list[tuple]) -> int:
        """Run `sql` once per row in one transaction; returns the rows changed once the commit is durable."""
        raise NotImplementedError

    def _read(self, sql: str, args: tuple = ()) -> list:
        """Rows that can be indexed by column name."""
        raise NotImplementedError

    def _append(self, rows: list[tuple]) -> int:
        """Insert audit rows in one transaction, their `seq` drawn in commit order: SQLite has one writer at a
        time already; PostgreSQL overrides this."""
        return self._write(INSERT_AUDIT, rows)

    def _start_audit_writer(self, deadline: float) -> None:
        """Audit rows go through one writer thread that commits every row waiting in one transaction; a `log`
        call waits at most `deadline` seconds for its rows (then `CommitTimeout`: the gateway answers 503)."""
        self._audit = GroupCommit(self._append, name=f"audit-log {self.name}", retry_alone=INTEGRITY,
                                  deadline=deadline)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # keys
    def create_key(self, account: str, rpm: int | None = None, tpm: int | None = None,
                   policy: str | None = None) -> str:
        """A new key for `account`; the key itself is returned this once and never stored."""
        if not account:
            raise ValueError("an account name is required")
        for name, limit in (("rpm", rpm), ("tpm", tpm)):
            if limit is not None and not 1 <= limit <= MAX_LIMIT:
                raise ValueError(f"{name} must be a positive whole number up to {MAX_LIMIT}, got {limit}")
        if policy is not None:
            parse_policy(policy)  # a misspelt policy fails now, not on the account's first request
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = _digest(key)
        self._write("INSERT INTO keys (id, lookup, digest, account, rpm, tpm, policy, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(secrets.token_hex(6), digest[:LOOKUP_CHARS], digest, account, rpm, tpm, policy, time.time())])
        return key

    def resolve(self, key: str) -> Account | None:
        """The account behind `key`, or None for an unknown or revoked key. The row is found by a prefix of
        the key's digest, so the lookup's timing depends on the digest, not on the secret; the full digest is
        then compared in constant time."""
        digest = _digest(key)
        for row in self._read("SELECT * FROM keys WHERE lookup = ?", (digest[:LOOKUP_CHARS],)):
            if hmac.compare_digest(row["digest"], digest):
                account = _account(row)
                return None if account.revoked else account
        return None

    def list_keys(self) -> list[Account]:
        return [_account(row) for row in self._read("SELECT * FROM keys ORDER BY created")]

    def revoke(self, key_id: str) -> bool:
        """Revoke a key by its id; False if no live key has that id."""
        return self._write("UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                           [(time.time(), key_id)]) == 1

    # audit log
    def log(self, *records: AuditRecord) -> None:
        """Append requests' rows; returns once they are durable. Rows logged at the same time from other
        threads share one transaction (a group commit). A repeated request id is an error, and then none of
        the rows of this call is written."""
        self._audit.submit([self._row(r) for r in records])

    def _row(self, r: AuditRecord) -> tuple:
        prompt, response = r.prompt, r.response
        if not self.keep_text:
            prompt, response = text_digest(prompt), response and text_digest(response)
        return (r.request_id, r.account, r.time, r.ip, r.payment, r.endpoint, prompt, response, r.prompt_tokens,
                r.completion_tokens, json.dumps(r.decisions), r.latency, r.status)

    def records(self, since: float | None = None, limit: int | None = None) -> list[AuditRecord]:
        """Rows at or after `since` in time order, the first `limit` of them (all without one)."""
        return self._records("time >= ?", "time, seq", (_from(since),), limit)

    def page(self, after_seq: int = 0, limit: int = 100, since: float | None = None) -> list[AuditRecord]:
        """The first `limit` rows committed after row `after_seq`, in commit order (those at or after `since`,
        if given). A reader that passes each page's last `seq` as the next `after_seq` reads every row once: rows
        that share a time, and rows committed while it reads, however old their time."""
        return self._records("seq > ? AND time >= ?", "seq", (after_seq, _from(since)), limit)

    def _records(self, where: str, order: str, args: tuple, limit: int | None) -> list[AuditRecord]:
        rows = self._read(f"SELECT seq, {AUDIT_COLUMNS} FROM audit WHERE {where} ORDER BY {order}"
                          + ("" if limit is None else " LIMIT ?"),  # the two spell "no limit" differently
                          (*args, *(() if limit is None else (limit,))))
        return [AuditRecord(**{**dict(row), "decisions": json.loads(row["decisions"])}) for row in rows]

    def purge(self, older_than_seconds: float, now: float | None = None) -> int:
        """Retention: delete audit rows older than the given age; returns how many went. In transactions of
        `PURGE_CHUNK` rows: SQLite has one writer, so a purge in one statement would hold every request's audit
        row (and its response) until the whole delete committed."""
        cutoff = (time.time() if now is None else now) - older_than_seconds
        deleted = 0
        while True:
            chunk = self._write("DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE time < ? LIMIT ?)",
                                [(cutoff, PURGE_CHUNK)])
            deleted += chunk
            if chunk < PURGE_CHUNK:
                return deleted
            time.sleep(0.001)  # lets the audit writer, woken when the lock was let go, take it before the next

    def _stream(self, sql: str, args: tuple = ()) -> Iterator[dict]:
        """Rows of a query as they are read, for a result too large to hold."""
        raise NotImplementedError

    def events_by_account(self, errors: Literal["raise", "skip"] = "raise",
                          skipped: list[int] | None = None) -> Iterator[tuple[str, list[Event]]]:
        """The audit log as each account's events in time order, one account at a time (what `distill-guard
        detect --log URL` reads: memory holds an account, not the log); `skipped[0]` counts bad rows."""
        rows = self._stream(f"SELECT {EVENT_COLUMNS} FROM audit ORDER BY account, time, seq")
        return events_by_client(map(_event_fields, rows), f"audit log {self.name}", errors, skipped)

    def events_of(self, accounts: list[str]) -> list[Event]:
        """The events of `accounts`, in time order (a linked group's pooled traffic)."""
        rows = []
        for at in range(0, len(accounts), 500):  # within any database's limit on a query's parameters
            part = accounts[at:at + 500]
            rows += self._read(f"SELECT {EVENT_COLUMNS}, seq FROM audit WHERE account IN "
                               f"({', '.join('?' * len(part))})", tuple(part))
        rows.sort(key=lambda r: (r["time"], r["seq"]))
        # rows the account stream skipped as bad are skipped here too
        return events_from_rows(map(_event_fields, rows), f"audit log {self.name}", "skip")[0]

    def read_events(self, errors: Literal["raise", "skip"] = "raise") -> tuple[list[Event], int]:
        """The audit log as the detectors' events, all held at once (what `distill-guard detect --benign URL` reads)."""
        rows = (_event_fields({"client": r.account, "time": r.time, "prompt": r.prompt, "prompt_tokens": r.prompt_tokens,
                               "response_tokens": r.completion_tokens, "endpoint": r.endpoint, "ip": r.ip,
                               "payment": r.payment, "response": r.response}) for r in self.records())
        return events_from_rows(rows, f"audit log {self.name}", errors)


def _from(since: float | None) -> float:
    return float("-inf") if since is None else since


def _account(row) -> Account:
    return Account(name=row["account"], key_id=row["id"], rpm=row["rpm"], tpm=row["tpm"], policy=row["policy"],
                   revoked=row["revoked"] is not None)


class SQLiteStore(Store):
    """One connection behind a lock writes; another reads, so that a key's lookup never waits for a commit's
    fsync (WAL lets readers run beside the writer)."""

    def __init__(self, path: str | Path, keep_text: bool = True, commit_deadline: float = COMMIT_DEADLINE):
        self.path, self.keep_text = Path(path), keep_text
        self.name = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock, self._read_lock = threading.Lock(), threading.Lock()
        self._db = self._connect()
        self._db.execute("PRAGMA journal_mode=WAL")
        with self._lock:
            # SQLite's rowid, named; AUTOINCREMENT: never reused, even once retention emptied the table
            self._db.executescript(SCHEMA.format(seq="seq INTEGER PRIMARY KEY AUTOINCREMENT"))
        self._reader = self._connect()
        self._start_audit_writer(commit_deadline)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=10000")  # another process (a CLI beside the gateway) may write
        return db

    def _write(self, sql: str, rows: list[tuple]) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                changed = self._db.executemany(sql, rows).rowcount
                self._db.execute("COMMIT")  # synchronous=FULL: on disk once this returns
            except BaseException:
                # A failed COMMIT is rolled back by SQLite itself on an I/O error, but not on every failure (a
                # deferred constraint, SQLITE_BUSY): left open, it would fail every later BEGIN of this writer.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return changed

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def _stream(self, sql: str, args: tuple = ()) -> Iterator[dict]:
        db = self._connect()  # its own connection: the reader's lock is not held for the whole read
        try:
            cursor = db.execute(sql, args)
            while rows := cursor.fetchmany(10_000):
                yield from map(dict, rows)
        finally:
            db.close()

    def close(self) -> None:
        self._audit.close()
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()


class PostgresStore(Store):
    """A pool of connections, each thread taking one at a time. `pool_timeout`: the most seconds a write or read
    waits for a connection, so that with the server down a request fails in that time (503), not in psycopg's
    default 30 s."""

    def __init__(self, url: str, keep_text: bool = True, max_connections: int = 8, pool_timeout: float = POOL_TIMEOUT,
                 commit_deadline: float = COMMIT_DEADLINE):
        self.keep_text = keep_text
        settings = {"autocommit": True, "row_factory": dict_row}  # transactions are opened where they are meant
        with psycopg.connect(url, **settings) as db:  # connection errors surface here, at once and clearly
            self.name = f"{db.info.host}/{db.info.dbname}"
            with db.transaction():
                # Replicas starting together would race on CREATE TABLE IF NOT EXISTS; one at a time.
                db.execute("SELECT pg_advisory_xact_lock(hashtext('distill-guard schema'))")
                db.execute(SCHEMA.format(seq="seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"))
        # connect_timeout: the pool's reconnections to an unreachable host give up (and try again) in seconds
        self._pool = ConnectionPool(url, kwargs={**settings, "connect_timeout": 5}, configure=_commit_synchronously,
                                    min_size=1, max_size=max_connections, timeout=pool_timeout, open=True)
        self._start_audit_writer(commit_deadline)

    def _append(self, rows: list[tuple]) -> int:
        # Replicas commit their audit rows one transaction at a time: `seq` is drawn at INSERT, so two replicas'
        # transactions could otherwise commit out of `seq` order, and a reader paging by it would pass a row that
        # commits later. The lock is held to the COMMIT; a batch's rows share it, so it costs one wait per batch.
        return self._write(INSERT_AUDIT, rows, lock="distill-guard audit")

    def _write(self, sql: str, rows: list[tuple], lock: str | None = None) -> int:
        """As `Store._write`; `lock`: an advisory lock taken first and held until the transaction ends."""
        with self._pool.connection() as db, db.transaction():  # COMMIT when the block ends, ROLLBACK on error
            if lock is not None:
                db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (lock,))
            cursor = db.cursor()
            cursor.executemany(sql.replace("?", "%s"), rows)
            return cursor.rowcount

    def _read(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._pool.connection() as db:
            return db.execute(sql.replace("?", "%s"), args).fetchall()

    def _stream(self, sql: str, args: tuple = ()) -> Iterator[dict]:
        # a server-side (named) cursor, which lives in a transaction: the server sends rows as they are read
        with self._pool.connection() as db, db.transaction():
            with db.cursor(name="distill-guard-stream") as cursor:
                cursor.itersize = 10_000
                cursor.execute(sql.replace("?", "%s"), args)
                yield from cursor

    def close(self) -> None:
        self._audit.close()
        self._pool.close()


def _commit_synchronously(db: psycopg.Connection) -> None:
    # Asked for, not assumed from the server's or the database's settings: a COMMIT returns once it is on disk.
    db.execute("SET synchronous_commit = on")


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(url: str, keep_text: bool = True) -> Store:
    """The store a URL names: `sqlite:///PATH` or `postgresql://USER@HOST[:PORT]/DB` (any libpq URL)."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(url.removeprefix("sqlite:///"), keep_text)
    if url.startswith(POSTGRES_SCHEMES):
        return PostgresStore(url, keep_text)
    raise ValueError(f"{url!r} is not a store URL: use sqlite:///PATH (relative), sqlite:////PATH (absolute) or "
                     "postgresql://USER@HOST/DB")


def is_store_url(source: str) -> bool:
    return source.startswith(("sqlite://", *POSTGRES_SCHEMES))


def shown_url(url: str) -> str:
    """`url` as reports and logs may show it: a password in it becomes ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
