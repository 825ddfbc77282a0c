"""The gateway's stores: API keys with their accounts, and the audit log, in one database named by a URL.

The embedded default is SQLite (`sqlite:///PATH`, relative; `sqlite:////PATH`, absolute) in WAL mode with
`synchronous=FULL`: a write returns only after its transaction is committed to disk, so a response the
gateway acknowledges after `log` returns cannot be lost to a crash. Audit rows are written by one thread that
commits every row waiting in one transaction (`GroupCommit`); one connection behind a lock writes, another
reads, so a key's lookup never waits for a commit's fsync.
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
from typing import Literal

from detectors.events import Event, events_from_rows
from guard.group_commit import GroupCommit
from guard.redaction import parse_policy

KEY_PREFIX = "dg-"
LOOKUP_CHARS = 16  # of the digest's hex, indexed: enough to make two keys' lookups collide almost never

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, lookup TEXT NOT NULL, digest TEXT NOT NULL, account TEXT NOT NULL,
    rpm INTEGER, tpm INTEGER, policy TEXT, created REAL NOT NULL, revoked REAL);
CREATE INDEX IF NOT EXISTS keys_by_lookup ON keys (lookup);
CREATE TABLE IF NOT EXISTS audit (
    request_id TEXT PRIMARY KEY, account TEXT NOT NULL, time REAL NOT NULL, ip TEXT, payment TEXT,
    endpoint TEXT NOT NULL, prompt TEXT NOT NULL, response TEXT, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, decisions TEXT NOT NULL, latency REAL, status INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time);
"""
INSERT_AUDIT = ("INSERT INTO audit (request_id, account, time, ip, payment, endpoint, prompt, response, prompt_tokens, "
                "completion_tokens, decisions, latency, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


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


def _digest(key: str) -> str:
    # A plain SHA-256 is enough here, unlike for passwords: the keys are 256 random bits, so there is no
    # dictionary to try and nothing a slow, salted hash would protect; it also lets a key be found by index.
    return hashlib.sha256(key.encode()).hexdigest()


def text_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class Store:
    """Keys and audit log in one SQLite file. `keep_text=False` logs only the SHA-256 of each prompt and
    response (repeats stay visible to `detect`; the text's content does not)."""

    def __init__(self, path: str | Path, keep_text: bool = True):
        self.path, self.keep_text = Path(path), keep_text
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock, self._read_lock = threading.Lock(), threading.Lock()
        self._db = self._connect()
        self._db.execute("PRAGMA journal_mode=WAL")
        with self._lock:
            self._db.executescript(SCHEMA)
        self._reader = self._connect()  # WAL: reads (a key's lookup) never wait for a commit's fsync
        self._audit = GroupCommit(lambda rows: self._write(INSERT_AUDIT, rows), name=f"audit-log {self.path.name}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=10000")  # another process (a CLI beside the gateway) may write
        return db

    def _write(self, sql: str, rows: list[tuple]) -> int:
        """Run `sql` once per row in one transaction; returns the rows changed once the commit is durable."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                changed = self._db.executemany(sql, rows).rowcount
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")  # synchronous=FULL: on disk once this returns
            return changed

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def close(self) -> None:
        self._audit.close()
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()

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
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be a positive whole number, got {limit}")
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

    def records(self, since: float | None = None) -> list[AuditRecord]:
        rows = self._read("SELECT * FROM audit WHERE time >= ? ORDER BY time, rowid",
                          (float("-inf") if since is None else since,))
        return [AuditRecord(**{**dict(row), "decisions": json.loads(row["decisions"])}) for row in rows]

    def purge(self, older_than_seconds: float, now: float | None = None) -> int:
        """Retention: delete audit rows older than the given age; returns how many went."""
        cutoff = (time.time() if now is None else now) - older_than_seconds
        return self._write("DELETE FROM audit WHERE time < ?", [(cutoff,)])

    def read_events(self, errors: Literal["raise", "skip"] = "raise") -> tuple[list[Event], int]:
        """The audit log as the detectors' events (what `distill-guard detect --log sqlite:///...` reads)."""
        rows = ({"client": r.account, "time": r.time, "prompt": r.prompt, "prompt_tokens": r.prompt_tokens,
                 "response_tokens": r.completion_tokens, "endpoint": r.endpoint, "ip": r.ip, "payment": r.payment}
                for r in self.records())
        return events_from_rows(rows, f"audit log {self.path}", errors)


def _account(row: sqlite3.Row) -> Account:
    return Account(name=row["account"], key_id=row["id"], rpm=row["rpm"], tpm=row["tpm"], policy=row["policy"],
                   revoked=row["revoked"] is not None)


def open_store(url: str, keep_text: bool = True) -> Store:
    """The store a URL names: `sqlite:///PATH` (PostgreSQL arrives with issue 17)."""
    if url.startswith("sqlite:///"):
        return Store(url.removeprefix("sqlite:///"), keep_text)
    if url.startswith(("postgresql://", "postgres://", "postgresql+")):
        raise ValueError(f"{url.split('://')[0]}: PostgreSQL support arrives with issue 17; use sqlite:///PATH")
    raise ValueError(f"{url!r} is not a store URL: use sqlite:///PATH (relative) or sqlite:////PATH (absolute)")


def is_store_url(source: str) -> bool:
    return source.startswith(("sqlite://", "postgresql://", "postgres://", "postgresql+"))
