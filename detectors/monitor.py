"""The online monitor: one call per request, an action per request, memory bounded however long it runs.

    monitor = Monitor(TrafficDetector().fit(benign_events))
    action = monitor.observe(event)        # Action("block", "p=0.002 after 50 requests: cot_share=1.00 ...")

Each client's `ClientState` is updated in amortised O(1); when the client reaches a checkpoint its
features are scored and its level is set from the conformal p-value: at most `target_fpr` -> block;
up to 2x -> throttle; up to 3x -> degrade; else allow. Each level includes the ones below it:
- degrade: answers are served without their reasoning (what a distiller needs, and most people do not);
- throttle: degraded, and at most `throttle_per_hour` requests an hour are served, the rest refused;
- block: nothing is served.
The mildest level comes first because it is the one a benign client is most likely to meet: by calibration
at most 3x `target_fpr` of benign clients are ever degraded, 2x throttled. `Action.served` says whether
this request goes through. Levels only go up. At most `max_clients` states are kept (least recently seen
evicted), so memory is bounded in clients as well as in requests per client.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from detectors.detector import TrafficDetector
from detectors.events import Event
from detectors.features import CHECKPOINTS, ClientState, embedding_features, hash_seed

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
                 throttle_per_hour: float = 60.0, max_clients: int = 100_000, seed: int = 0):
        self.detector, self.seed, self.max_clients = detector, seed, max_clients
        self.settings = (throttle_factor, degrade_factor, throttle_per_hour, max_clients, seed)
        fpr = detector.target_fpr
        self.thresholds = (("block", fpr), ("throttle", fpr * throttle_factor), ("degrade", fpr * degrade_factor))
        self.throttle_gap = 3600.0 / throttle_per_hour
        self.states: OrderedDict[str, ClientState] = OrderedDict()
        self.actions: dict[str, Action] = {}  # flagged clients only; kept after their state is evicted
        self.next_served: dict[str, float] = {}  # throttled clients: when their next request may go through
        self.marks = set(CHECKPOINTS)

    def observe(self, event: Event) -> Action:
        state = self.states.get(event.client)
        if state is None:
            state = self.states[event.client] = ClientState(seed=hash_seed(event.client, self.seed))
            if len(self.states) > self.max_clients:
                self.states.popitem(last=False)
        else:
            self.states.move_to_end(event.client)
        state.update(event)
        if state.count in self.marks:
            self._decide(event.client, state)
        action = self.actions.get(event.client, ALLOW)
        if action.kind == "throttle":
            if event.time < self.next_served.get(event.client, -float("inf")):
                return replace(action, served=False)
            self.next_served[event.client] = event.time + self.throttle_gap
        return action

    def _decide(self, client: str, state: ClientState) -> None:
        d = self.detector
        features = state.features()
        if d.use_embeddings:
            features.update(embedding_features(d.embedder_(state.sample()), d.reference_, d.bandwidth_))
        _, p = d.score_features(features)
        current = self.actions.get(client, Action("allow"))
        for kind, threshold in self.thresholds:
            if p <= threshold:
                if LEVELS.index(kind) > LEVELS.index(current.kind):
                    reason = f"p={p:.3g} after {state.count} requests: " + ", ".join(d.unusual(features))
                    self.actions[client] = Action(kind, reason, p, served=kind != "block")
                return
