"""Group commit: one writer thread commits every batch of rows waiting in one transaction, and wakes each
submitter once its rows are durable.

A durable commit costs an fsync, milliseconds on an ordinary disk; one transaction per request would queue
requests behind each other's fsyncs. Here the requests that arrive while one commit is on disk share the next
one, so throughput grows with the rows per fsync, while each submitter still returns only once its own rows are
on disk: an acknowledged row is never lost.

When a batch fails, what failed decides what happens next. A row of the batch can be at fault (a repeated id:
an integrity error), and then each submitter's rows are tried alone, so that one caller's bad rows fail only
that caller. Otherwise the store itself failed (down, unreachable, full), and every submitter of the batch gets
the error at once, and so do those that queued behind it while it failed: trying each alone, or the next batch
at once, would cost each the store's whole timeout again, and a queue of N waiting requests N timeouts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, wait


class CommitTimeout(TimeoutError):
    """A submitter's rows were not committed within its deadline: the store is too slow, or down. They may
    still be committed later, if the writer had already taken them."""


class GroupCommit:
    """Commits rows through `write(rows)` (one durable transaction) from a thread of its own.

    Args:
        write: writes every row it is given in one transaction and returns once it is committed, or raises and
            writes none of them.
        retry_alone: the errors a row can cause (integrity errors): the batch is then tried again one
            submitter at a time. Any other error fails the whole batch at once.
        deadline: the most seconds `submit` waits for its rows; then it raises `CommitTimeout`. None: no limit.

    Example:
        >>> commits = GroupCommit(lambda rows: print(len(rows), "rows"))
        >>> commits.submit([("req-1", "alice")])  # returns once the rows are written
        1 rows
        >>> commits.close()
    """

    def __init__(self, write: Callable[[list], object], name: str = "group-commit",
                 retry_alone: tuple[type[BaseException], ...] = (), deadline: float | None = None):
        self.write, self.retry_alone, self.deadline = write, retry_alone, deadline
        self._waiting: list[tuple[list, Future]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, rows: list) -> None:
        """Returns once `rows` are committed, all together; raises what writing them raised (then none is), or
        `CommitTimeout` after `deadline` seconds."""
        done: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("this store is closed")
            self._waiting.append((rows, done))
            self._wake.notify()
        if not wait([done], self.deadline).done:
            done.cancel()  # still waiting: the writer skips it; already taken: it may yet be committed
            raise CommitTimeout(f"the audit rows were not committed within {self.deadline:g} s")
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
                if not self._waiting:
                    return  # closed, and nothing left waiting
            batch = self._take_waiting()
            if batch:
                self._commit(batch)

    def _take_waiting(self) -> list[tuple[list, Future]]:
        """Every submission waiting now, less those whose deadline passed (cancelled)."""
        with self._wake:
            batch, self._waiting = self._waiting, []
        return [(rows, done) for rows, done in batch if done.set_running_or_notify_cancel()]

    def _commit(self, batch: list[tuple[list, Future]]) -> None:
        try:
            self.write([row for rows, _ in batch for row in rows])
        except self.retry_alone as error:
            if len(batch) == 1:
                batch[0][1].set_exception(error)
                return
            for one in batch:  # one submitter's bad rows (a repeated id) must not fail the others
                self._commit([one])
            return
        except BaseException as error:  # the store failed, not a row: nothing would go better alone or at once
            for _, done in batch + self._take_waiting():
                done.set_exception(error)
            return
        for _, done in batch:
            done.set_result(None)
