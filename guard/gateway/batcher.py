"""A small dynamic batcher: concurrent requests to one teacher go out together, not one behind another.

Requests that wait while the teacher generates, and those that arrive within `window` seconds of the oldest
waiting one, up to `max_batch` of them, reach `teacher.complete(prompts, sampling, callers)` in one call, and
each waiter gets its own completion (or the batch's exception). The default window is 0: an idle teacher takes
a lone request at once (no added latency), and under load the requests that queue behind a batch form the
next one. One worker thread makes every call, so the teacher still sees one call at a time and
every prompt in arrival order: a defence that decides each request from the ones before it (the monitor)
decides as it would behind a lock.

What shares a batch: consecutive requests to the same teacher with equal `Sampling`. A request that differs
closes the batch before it rather than jumping the queue. A request with a seed is always sent alone: a local
teacher seeds once per call, so in a batch its draw would depend on who else asked, and the same seed would
not give the same answer twice.

The queue is bounded (`max_queue` prompts): past it, `submit` raises `Overloaded` at once (the gateway answers 503
with Retry-After) rather than letting waiters pile up behind a teacher that cannot keep up. A waiter that gives
up (its client went away) cancels its futures, and a cancelled prompt is dropped before it reaches the teacher.

Greedy text does not depend on the batch: the local backend left-pads with an attention mask (on the reference
teacher, batched and solo greedy text matched on every lab prompt we tried). An upstream (OpenAI-compatible)
backend does not need it: the gateway calls one from each request's thread (`Teacher.concurrent`).

Example:
    >>> batcher = Batcher(max_batch=16)
    >>> batcher.start()
    >>> batcher.complete(teacher, "question: where does Kalon live?\\n", GREEDY, Caller("acme")).answer
    >>> batcher.stop()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from guard.teacher import Caller, Completion, Sampling, Teacher


@dataclass
class _Request:
    teacher: Teacher
    prompt: str
    sampling: Sampling
    caller: Caller
    arrived: float = field(default_factory=time.monotonic)
    answer: Future = field(default_factory=Future)

    def joins(self, head: _Request) -> bool:
        return self.teacher is head.teacher and self.sampling == head.sampling and head.sampling.seed is None


class Overloaded(RuntimeError):
    """The batcher's queue is full: the caller should come back later."""


class Batcher:
    """Batches `complete` calls from many threads into few calls to the teacher, made by one worker thread.

    Args:
        window: seconds the oldest waiting request waits for others to join it (0: none); a request that waited
            longer than that behind the previous batch goes out with whatever came meanwhile.
        max_batch: the most prompts in one call; 1 serialises the requests, as a lock would.
        max_queue: the most prompts waiting; a submit that would pass it raises `Overloaded`.
    """

    def __init__(self, window: float = 0.0, max_batch: int = 16, max_queue: int = 1024):
        if window < 0 or max_batch < 1 or max_queue < 1:
            raise ValueError(f"window must be >= 0, max_batch and max_queue >= 1, got {window}, {max_batch} and "
                             f"{max_queue}")
        self.window, self.max_batch, self.max_queue = window, max_batch, max_queue
        self.pending: deque[_Request] = deque()
        self.changed = threading.Condition()
        self.worker: threading.Thread | None = None
        self.stopping = False

    def start(self) -> Batcher:
        self.stopping = False
        self.worker = threading.Thread(target=self._run, name="distill-guard-batcher", daemon=True)
        self.worker.start()
        return self

    def stop(self) -> None:
        """Answer what is already waiting, then end the worker."""
        with self.changed:
            self.stopping = True
            self.changed.notify()
        if self.worker is not None:
            self.worker.join()
            self.worker = None

    def complete(self, teacher: Teacher, prompt: str, sampling: Sampling, caller: Caller) -> Completion:
        """`teacher`'s completion of `prompt` for `caller`, made in a batch; the batch's exception if it failed."""
        return self.submit(teacher, [prompt], sampling, caller)[0].result()

    def submit(self, teacher: Teacher, prompts: list[str], sampling: Sampling, caller: Caller) -> list[Future]:
        """Queue `prompts` together, in order (one request's several prompts may then share a batch); each
        future holds its completion or the batch's exception, and a future cancelled while it waits is dropped.
        Raises `Overloaded` when the queue cannot take them all."""
        requests = [_Request(teacher, prompt, sampling, caller) for prompt in prompts]
        with self.changed:
            if self.worker is None or self.stopping:
                raise RuntimeError("the batcher is not running: start() it first (the server does, at start-up)")
            if len(self.pending) + len(requests) > self.max_queue:
                raise Overloaded(f"{len(self.pending)} prompts are waiting for the teacher; the queue holds "
                                 f"{self.max_queue}")
            self.pending.extend(requests)
            self.changed.notify()
        return [request.answer for request in requests]

    def _joined(self) -> int:
        """How many waiting requests, from the oldest on, can go out with it in one call."""
        head, n = self.pending[0], 1
        while n < min(len(self.pending), self.max_batch) and self.pending[n].joins(head):
            n += 1
        return n

    def _next_batch(self) -> list[_Request]:
        with self.changed:
            while not self.pending and not self.stopping:
                self.changed.wait()
            if not self.pending:
                return []
            deadline = self.pending[0].arrived + self.window
            # wait while the batch could still grow: the next request might join it
            while (not self.stopping and (n := self._joined()) == len(self.pending) and n < self.max_batch
                   and (left := deadline - time.monotonic()) > 0):
                self.changed.wait(left)
            return [self.pending.popleft() for _ in range(self._joined())]

    def _run(self) -> None:
        while batch := self._next_batch():
            # a waiter that gave up cancelled its future: its prompt is not generated
            if not (batch := [r for r in batch if r.answer.set_running_or_notify_cancel()]):
                continue
            head = batch[0]
            try:
                answers = head.teacher.complete([r.prompt for r in batch], head.sampling, [r.caller for r in batch])
                if len(answers) != len(batch):
                    raise RuntimeError(f"{head.teacher.name} answered {len(answers)} of {len(batch)} prompts")
            except Exception as e:  # every waiter learns of it; none waits forever
                for request in batch:
                    request.answer.set_exception(e)
                continue
            for request, answer in zip(batch, answers):
                request.answer.set_result(answer)
