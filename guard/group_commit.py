"""Group commit: one writer thread commits every batch of rows waiting in one transaction, and wakes each
submitter once its rows are durable.

A durable commit costs an fsync, milliseconds on an ordinary disk; one transaction per request would queue
requests behind each other's fsyncs. Here the requests that arrive while one commit is on disk share the next
one, so throughput grows with the rows per fsync, while each submitter still returns only once its own rows are
on disk: an acknowledged row is never lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future


class GroupCommit:
    """Commits rows through `write(rows)` (one durable transaction) from a thread of its own.

    Args:
        write: writes every row it is given in one transaction and returns once it is committed, or raises and
            writes none of them.

    Example:
        >>> commits = GroupCommit(lambda rows: print(len(rows), "rows"))
        >>> commits.submit([("req-1", "alice")])  # returns once the rows are written
        1 rows
        >>> commits.close()
    """

    def __init__(self, write: Callable[[list], object], name: str = "group-commit"):
        self.write = write
        self._waiting: list[tuple[list, Future]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, rows: list) -> None:
        """Returns once `rows` are committed, all together; raises what writing them raised (then none is)."""
        done: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("this store is closed")
            self._waiting.append((rows, done))
            self._wake.notify()
        done.result()

    def close(self) -> None:
        """Commit what is waiting, then stop the writer."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                batch, self._waiting = self._waiting, []
            if not batch:
                return  # closed, and nothing left waiting
            self._commit(batch)

    def _commit(self, batch: list[tuple[list, Future]]) -> None:
        try:
            self.write([row for rows, _ in batch for row in rows])
        except BaseException as error:
            if len(batch) == 1:
                batch[0][1].set_exception(error)
                return
            for one in batch:  # one submitter's bad rows (a repeated id) must not fail the others
                self._commit([one])
            return
        for _, done in batch:
            done.set_result(None)
