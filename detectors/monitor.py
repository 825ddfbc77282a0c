"""The online monitor: one call per request, an action per request, memory bounded however long it runs.

    monitor = Monitor(TrafficDetector().fit(benign_events))
    action = monitor.observe(event)        # Action("block", "p=0.002 after 50 requests: cot_share=1.00 ...")

Each client's `ClientState` is updated in amortised O(1); whenever the client's current window reaches a
checkpoint (its 25th, 50th, ... request, then the same in each later window of its life, see
`detectors.features`), its features are scored and its level is set from the conformal p-value: at most
`target_fpr` -> block; up to 2x -> throttle; up to 3x -> degrade; else allow. Each level includes the ones
below it:
- degrade: answers are served without their reasoning (what a distiller needs, and most people do not);
- throttle: degraded, and at most `throttle_per_hour` requests an hour are served, the rest refused;
- block: nothing is served.
The mildest level comes first because it is the one a benign client is most likely to meet: by calibration
at most 3x `target_fpr` of benign clients are degraded in their first window, 2x throttled. Each later
window is one more test at the same level, so a benign client that lives for m windows meets a false
alarm with probability at most m times that (a union bound); that is the price of judging a client for its
whole life, which an account that turns to harvesting after a long benign life makes necessary.
`Action.served` says whether this request goes through. Levels only go up.

Memory is bounded in clients as well as in requests per client. At most `max_clients` states are kept
(least recently seen evicted). Flagged clients' actions (and a throttled client's next allowed time) are
kept apart from the states, for up to `max_flagged` clients (least recently seen evicted): an action is
small, so many more are kept than states (keep `max_flagged` >= `max_clients`, so a flag outlives its
client's state), and a flagged client whose state was evicted stays flagged when it returns. A flagged
client evicted from both is served again as a new client and judged afresh, from its first window's first
checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from detectors.detector import TrafficDetector
from detectors.events import Event
from detectors.features import ClientState, embedding_features, hash_seed
from guard.redaction import AnswerOnly, Redact
from guard.teacher import Completion, Sampling, Teacher

LEVELS = ("allow", "degrade", "throttle", "block")


@dataclass(frozen=True)
class Action:
    kind: Literal["allow", "degrade", "throttle", "block"]
    reason: str = ""
    p_value: float | None = None
    served: bool = True  # whether this request goes through (a throttled client's are, at the allowed rate)


ALLOW = Action("allow")


class Monitor:
    def __init__(self, detector: TrafficDetector, throttle_factor: float = 2.0, degrade_factor: float = 3.0,
                 throttle_per_hour: float = 60.0, max_clients: int = 100_000, seed: int = 0,
                 max_flagged: int = 1_000_000):
        self.detector, self.seed, self.max_clients, self.max_flagged = detector, seed, max_clients, max_flagged
        self.settings = (throttle_factor, degrade_factor, throttle_per_hour, max_clients, seed, max_flagged)
        fpr = detector.target_fpr
        self.thresholds = (("block", fpr), ("throttle", fpr * throttle_factor), ("degrade", fpr * degrade_factor))
        self.throttle_gap = 3600.0 / throttle_per_hour
        self.states: OrderedDict[str, ClientState] = OrderedDict()
        self.actions: OrderedDict[str, Action] = OrderedDict()  # flagged clients only
        self.next_served: dict[str, float] = {}  # throttled clients in `actions`: when the next one is served

    def observe(self, event: Event) -> Action:
        client = event.client
        state = self.states.get(client)
        if state is None:
            state = self.states[client] = ClientState(seed=hash_seed(client, self.seed))
            if len(self.states) > self.max_clients:
                self.states.popitem(last=False)
        else:
            self.states.move_to_end(client)
        state.update(event)
        if state.due:
            self._decide(client, state)
        action = self.actions.get(client, ALLOW)
        if action is ALLOW:
            return action
        self.actions.move_to_end(client)
        if action.kind == "throttle":
            if event.time < self.next_served.get(client, -float("inf")):
                return replace(action, served=False)
            self.next_served[client] = event.time + self.throttle_gap
        return action

    def _decide(self, client: str, state: ClientState) -> None:
        d = self.detector
        features = state.features()
        if d.use_embeddings:
            features.update(embedding_features(d.embedder_(state.sample()), d.reference_, d.bandwidth_))
        _, p = d.score_features(features)
        current = self.actions.get(client, ALLOW)
        for kind, threshold in self.thresholds:
            if p <= threshold:
                if LEVELS.index(kind) > LEVELS.index(current.kind):
                    judged = f" (judged on its last {state.in_window})" if state.count > state.in_window else ""
                    reason = f"p={p:.3g} after {state.count} requests{judged}: " + ", ".join(d.unusual(features))
                    self._flag(client, Action(kind, reason, p, served=kind != "block"))
                return

    def _flag(self, client: str, action: Action) -> None:
        self.actions[client] = action
        self.actions.move_to_end(client)
        if action.kind != "throttle":
            self.next_served.pop(client, None)
        if len(self.actions) > self.max_flagged:
            evicted, _ = self.actions.popitem(last=False)
            self.next_served.pop(evicted, None)


class Guarded(Teacher):
    """A teacher behind the monitor, as a harvester reaches it: each prompt is a request at `interval`
    seconds from the last, sent round-robin from `accounts` accounts (a sybil swarm when more than one),
    each attack request hidden among `cover` benign requests of the same account on average (a hydra:
    attack traffic mixed into a legitimate account; the benign requests go through the monitor, and their
    answers to their owner, not to the harvest).

    Requests the monitor does not serve come back refused (empty, finish_reason "refused"; the query is
    spent); a degraded or throttled account's served requests come back answer-only. The same wrapper serves
    and evaluates the defence.
    """

    def __init__(self, teacher: Teacher, monitor: Monitor, client: str = "attacker", interval: float = 2.0,
                 accounts: int = 1, cover: float = 0.0, start: float = 1_767_225_600.0, seed: int = 0):
        if accounts < 1 or cover < 0 or interval <= 0:
            raise ValueError(f"need accounts >= 1, cover >= 0 and interval > 0; got {accounts}, {cover}, {interval}")
        self.teacher, self.monitor, self.client, self.interval = teacher, monitor, client, interval
        self.accounts, self.cover, self.sent = accounts, cover, 0
        self.start = self.clock = start
        self.name = f"{teacher.name}+monitor"
        self.degraded = Redact(teacher, AnswerOnly())
        self.rng = np.random.default_rng(seed)
        self.benign = None
        self.log: list[Action] = []

    def for_attack(self, seed: int) -> "Guarded":
        """The same deployment before attack `seed` began: a monitor with no history, the same traffic shape."""
        return Guarded(self.teacher, Monitor(self.monitor.detector, *self.monitor.settings), self.client,
                       self.interval, self.accounts, self.cover, self.start, seed)

    @property
    def benign_view(self) -> Teacher:
        """The teacher as an unflagged client gets it (what `evaluate` grades as served)."""
        return self.teacher

    def _cover_traffic(self, account: str) -> None:
        if self.benign is None:
            from detectors.simulate import PromptSource

            self.benign = PromptSource(seed=int(self.rng.integers(2**31)))
        for _ in range(self.rng.poisson(self.cover)):
            self.clock += self.rng.exponential(self.interval / (1 + self.cover))
            self.monitor.observe(Event(account, self.clock, self.benign.benign()))

    def complete(self, prompts: list[str], sampling: Sampling = Sampling()) -> list[Completion]:
        actions = []
        for prompt in prompts:
            account = self.client if self.accounts == 1 else f"{self.client}-{self.sent % self.accounts}"
            if self.cover:
                self._cover_traffic(account)
            actions.append(self.monitor.observe(Event(account, self.clock, prompt)))
            self.clock += self.interval
            self.sent += 1
        self.log += actions
        out: list[Completion | None] = [None] * len(prompts)
        for degraded, teacher in ((False, self.teacher), (True, self.degraded)):
            chosen = [i for i, a in enumerate(actions) if a.served and (a.kind != "allow") == degraded]
            for i, completion in zip(chosen, teacher.complete([prompts[i] for i in chosen], sampling) if chosen else []):
                out[i] = completion
        return [c if c is not None else Completion(text="", finish_reason="refused") for c in out]
