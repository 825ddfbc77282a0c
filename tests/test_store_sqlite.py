"""The embedded store's writer under faults (issue 26, item 10): a COMMIT that fails, and a long retention purge
beside the audit writer. Real SQLite files."""

import threading
import time

import pytest

from guard.store import AuditRecord, SQLiteStore


def row(request_id: str, at: float = 100.0) -> AuditRecord:
    return AuditRecord(request_id, "alice", at, "question")


def test_a_failed_commit_leaves_the_writer_ready_for_the_next(tmp_path):
    """SQLite rolls a transaction back by itself when its COMMIT fails on an I/O error, but not on every failure:
    a deferred constraint (here a deferred foreign key), or SQLITE_BUSY in rollback-journal mode, leaves the
    transaction open, and then every later write of the store failed ("cannot start a transaction within a
    transaction") until the gateway restarted."""
    store = SQLiteStore(tmp_path / "store.db")
    store._db.execute("PRAGMA foreign_keys = ON")  # the writer's connection checks foreign keys, at COMMIT
    store._write("CREATE TABLE parent (id INTEGER PRIMARY KEY)", [()])
    store._write("CREATE TABLE child (parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)", [()])
    with pytest.raises(Exception, match="FOREIGN KEY constraint failed"):
        store._write("INSERT INTO child VALUES (?)", [(1,)])  # no parent 1: the INSERT passes, the COMMIT fails
    store.log(row("after"))
    assert [r.request_id for r in store.records()] == ["after"]
    assert store._read("SELECT count(*) AS n FROM child")[0]["n"] == 0  # the failed transaction is gone
    store.close()


def test_a_row_logged_during_a_long_retention_purge_commits_before_the_purge_ends(tmp_path):
    """SQLite has one writer: a purge in one statement held it for the whole delete, and every request waited
    behind it (past its deadline, a 503)."""
    store = SQLiteStore(tmp_path / "store.db")
    store.log(*(row(f"old-{i}", at=0.0) for i in range(100_000)))
    done = {}

    def purge() -> None:
        done["purged"] = store.purge(older_than_seconds=10, now=100.0)
        done["purge"] = time.monotonic()

    purging = threading.Thread(target=purge)
    purging.start()
    while not store._lock.locked():  # the purge holds the writer
        time.sleep(0.001)
    store.log(row("new"))
    done["log"] = time.monotonic()
    purging.join()
    assert done["purged"] == 100_000 and [r.request_id for r in store.records()] == ["new"]
    assert done["log"] < done["purge"]  # its turn came between two of the purge's chunks
    store.close()
