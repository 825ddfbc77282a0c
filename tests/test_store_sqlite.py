"""The embedded store's writer under faults (issue 26, item 10): a COMMIT that fails, and a long retention purge
beside the audit writer. Real SQLite files."""

import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from guard.gateway.store import AuditRecord, SQLiteStore

STRACE = shutil.which("strace")
WRITER = """
import os, sys
from guard.gateway.store import AuditRecord, SQLiteStore
store = SQLiteStore(sys.argv[1])
for n in range(int(sys.argv[2])):
    store.log(AuditRecord(request_id=f"req-{n}", account="alice", time=float(n), prompt=f"question {n}"))
    os.write(1, f"{n + 1}\\n".encode())  # acknowledged (one write call): the row's write returned
"""


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


@pytest.mark.skipif(STRACE is None, reason="needs strace (apt-get install strace)")
def test_each_row_is_fsynced_to_the_write_ahead_log_before_it_is_acknowledged(tmp_path):
    """Durability past a power cut, which `kill -9` cannot show (the OS page cache outlives the process, so the
    kill tests pass with synchronous=OFF too): strace watches the writer, and between one acknowledgement and
    the next the write-ahead log is fsynced. With synchronous=NORMAL or OFF it is not."""
    rows, trace = 20, tmp_path / "strace.txt"
    strace = [STRACE, "--follow-forks", "--seccomp-bpf", "--decode-fds=path", "--trace=fsync,fdatasync,write",
              "--output", str(trace)]  # every thread; only these calls stop the writer; fds named by their path
    traced = subprocess.run([*strace, sys.executable, "-c", WRITER, str(tmp_path / "store.db"), str(rows)],
                            capture_output=True, text=True, timeout=120)
    if traced.returncode != 0 and "ptrace" in traced.stderr:
        pytest.skip(f"strace cannot trace here: {traced.stderr.strip()[:200]}")
    assert traced.returncode == 0, traced.stderr[-2000:]
    acknowledged, synced, unsynced = 0, False, []
    for line in trace.read_text().splitlines():
        if re.search(r"\b(fsync|fdatasync)\(\d+<[^>]*store\.db-wal>", line):
            synced = True
        elif re.search(r"\bwrite\(1<", line):  # the writer prints an acknowledgement
            acknowledged += 1
            if not synced:
                unsynced.append(acknowledged)
            synced = False
    assert acknowledged == rows
    assert unsynced == [], f"acknowledged with no fsync of the WAL since the one before: rows {unsynced}"
