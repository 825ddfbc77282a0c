"""Defences by name, as the CLI, the server and `evaluate` spell them, built from their parts.

Names join with "+", innermost first: "watermark+answer-only" is Redact(Watermark(teacher)). What a defence
needs beyond its name is passed in, never assumed: the watermark's master secret, the monitor's fitted
detector, the summariser. A missing part is an error that says what to pass.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from detectors.detector import TrafficDetector
from detectors.events import Event
from detectors.monitor import Monitor
from guard.gateway.shared_state import SharedMonitor, SharedState
from guard.redaction import POLICIES, AnswerOnly, Policy, Redact, Sealer, Summarize, parse_policy
from guard.teacher import Caller, Completion, Defense, Sampling, Teacher, callers_for
from watermark.kgw import Watermark, WatermarkConfig

WATERMARKS = ("watermark", "watermark:CLIENT")
DEFENSES = ("none", *POLICIES, *WATERMARKS, "monitor")


@dataclass
class DefenseParts:
    """What defences need beyond their names. `watermark_master`: the provider's master secret (per-account
    keys derive from it); `detector`: a `TrafficDetector` fitted on benign traffic, for the monitor;
    `summarize` and `sealer`: for the summary and sealed policies; `shared`: Redis, when gateway replicas share
    the monitor's state."""

    watermark_master: bytes | None = None
    watermark_config: WatermarkConfig = WatermarkConfig()
    detector: TrafficDetector | None = None
    summarize: Summarize | None = None
    sealer: Sealer | None = None
    shared: SharedState | None = None  # gateway replicas' Redis: the monitor judges all replicas' traffic as one
    marked_reasoning: bool = True  # the model marks where its reasoning ends; see `Policy.marked`


def parse_defense(spec: str) -> list[tuple[str, str]]:
    """(kind, argument) of each layer `spec` names, innermost first; a misspelt name fails here, before any
    model loads."""
    if spec == "none":
        return []
    layers = []
    for part in spec.split("+"):
        kind, _, argument = part.partition(":")
        if kind == "watermark" or (kind == "monitor" and not argument):
            layers.append((kind, argument))
            continue
        if kind == "monitor":
            raise ValueError(f"{part!r}: the monitor takes no settings; the attacker's pace, accounts and cover "
                             "traffic belong to the attack (evaluate --pace/--accounts/--cover)")
        parse_policy(part)  # raises on an unknown policy, listing the known ones
        layers.append(("redact", part))
    if not layers:
        raise ValueError(f"unknown defence {spec!r}; available: {', '.join(DEFENSES)}, or several joined by '+'")
    return layers


def build_defense(spec: str, teacher: Teacher, parts: DefenseParts = DefenseParts()) -> Teacher:
    """The teacher as served under defence `spec` (see `DEFENSES`), innermost layer first."""
    for kind, argument in parse_defense(spec):
        if kind == "watermark":
            if parts.watermark_master is None:
                raise ValueError("the watermark needs the provider's master secret: set $DISTILL_GUARD_WATERMARK_KEY "
                                 "(make one with `distill-guard watermark keygen`) or pass a key file")
            teacher = Watermark(teacher, parts.watermark_master, parts.watermark_config, client=argument or None)
        elif kind == "monitor":
            if parts.detector is None:
                raise ValueError("the monitor needs a detector fitted on benign traffic (`distill-guard detect "
                                 "--benign LOG` fits one; the lab has its own)")
            monitor = Monitor(parts.detector)
            teacher = Monitored(teacher, monitor if parts.shared is None else SharedMonitor(monitor, parts.shared))
        else:
            teacher = Redact(teacher, parse_policy(argument, parts.summarize, parts.sealer, parts.marked_reasoning))
    return teacher


def split_outer_policy(spec: str, parts: DefenseParts = DefenseParts()) -> tuple[str, Policy | None]:
    """(`spec` without its outermost layer, that layer's policy) when the outermost layer is a redaction, else
    (`spec`, None). A server applies that policy itself, so a stream goes out through its `StreamRedactor`."""
    layers = parse_defense(spec)
    if not layers or layers[-1][0] != "redact":
        return spec, None
    inner, _, outer = spec.rpartition("+")
    return inner or "none", parse_policy(outer, parts.summarize, parts.sealer, parts.marked_reasoning)


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
        for i, action in enumerate(actions):
            if out[i] is None:
                out[i] = Completion(text="", finish_reason="refused")
            if action.kind != "allow":  # the verdict and its reason travel with the answer, to the audit log
                out[i].decisions["monitor"] = f"{action.kind}: {action.reason}"
        return out
