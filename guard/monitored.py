"""The traffic monitor as a defence: `Monitored` serves each request as its account's verdict allows."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence

from detectors.events import Event
from detectors.monitor import Monitor
from guard.redaction import AnswerOnly, Redact
from guard.teacher import Caller, Completion, Defense, Sampling, Teacher, callers_for


class Monitored(Defense):
    """A teacher behind the traffic monitor: each request is an event of its caller's account, at the caller's
    time (the wall clock when the caller gives none), and the account's verdict decides what it gets.

    Refused requests come back empty with finish_reason "refused"; a degraded or throttled account's served
    requests come back answer-only.
    """

    keeps_history = True

    def __init__(self, teacher: Teacher, monitor: Monitor):
        super().__init__(teacher)
        # a monitor shared through Redis guards its own state and takes no lock across its network calls: one
        # here would make every request thread wait out a slow Redis behind whichever thread holds it
        self.monitor = monitor
        self.lock = contextlib.nullcontext() if getattr(monitor, "thread_safe", False) else threading.Lock()
        self.name = f"{teacher.name}+monitor"

    def fresh(self) -> Monitored:
        clone = super().fresh()
        clone.monitor, clone.lock = Monitor(self.monitor.detector, *self.monitor.settings), threading.Lock()
        return clone

    def _judge(self, prompts: list[str], callers: Sequence[Caller]) -> list:
        with self.lock:  # the gateway's batcher and its request threads both report requests
            return [self.monitor.observe(Event(c.account, time.time() if c.time is None else c.time, p, ip=c.ip,
                                               payment=c.payment))
                    for p, c in zip(prompts, callers)]

    def observe(self, prompts: list[str], callers: Sequence[Caller]) -> None:
        self._judge(prompts, callers)
        self.teacher.observe(prompts, callers)

    def complete(self, prompts: list[str], sampling: Sampling = Sampling(),
                 callers: Sequence[Caller] | None = None) -> list[Completion]:
        callers = callers_for(prompts, callers)
        actions = self._judge(prompts, callers)
        out: list[Completion | None] = [None] * len(prompts)
        for degraded, served in ((False, self.teacher), (True, Redact(self.teacher, AnswerOnly()))):
            chosen = [i for i, a in enumerate(actions) if a.served and (a.kind != "allow") == degraded]
            if chosen:
                answers = served.complete([prompts[i] for i in chosen], sampling, [callers[i] for i in chosen])
                for i, completion in zip(chosen, answers):
                    out[i] = completion
        with self.lock:  # what each account was answered: answer chaining reads it
            for prompt, caller, completion in zip(prompts, callers, out):
                if completion is not None:
                    self.monitor.answered(caller.account, prompt, completion.text)
        for i, action in enumerate(actions):
            if out[i] is None:
                out[i] = Completion(text="", finish_reason="refused")
            if action.kind != "allow":  # the verdict and its reason travel with the answer, to the audit log
                out[i].decisions["monitor"] = f"{action.kind}: {action.reason}"
        return out
