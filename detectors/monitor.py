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

With `link` (the default), accounts are also linked online (`detectors.cluster.Linker`: a shared payment,
or two of network, a script's clock, wording templates and joint coverage): a linked group of `min_group` or
more accounts has its pooled traffic judged as one client, from its members' first requests on, and its
level applies to each member (the stronger of the two when the member has its own). Groups that merge keep
the larger one's pooled traffic.

Campaigns: every `campaign_every` requests, the clients kept are tested as a population
(`detectors.campaign`: accounts that, together, ask the task's rare questions without ever asking one twice,
as the parts of one harvest spread over small accounts do); each member an alarming campaign names is
degraded. The test runs on the request that crosses the mark (a few seconds, once per `campaign_every`).

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


from detectors.campaign import QuestionLog, find_campaigns
from detectors.cluster import Linker
from detectors.detector import TrafficDetector
from detectors.events import Event, compact
from detectors.features import ClientState, embedding_features, hash_seed

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
                 max_flagged: int = 1_000_000, link: bool = True, min_group: int = 3, campaign_every: int = 10_000):
        self.detector, self.seed, self.max_clients, self.max_flagged = detector, seed, max_clients, max_flagged
        self.settings = (throttle_factor, degrade_factor, throttle_per_hour, max_clients, seed, max_flagged, link,
                         min_group, campaign_every)
        self.campaign_every, self.observed = campaign_every, 0
        self.questions = QuestionLog(detector.popularity_)  # the kept clients' answered questions (campaigns)
        fpr = detector.target_fpr
        self.thresholds = (("block", fpr), ("throttle", fpr * throttle_factor), ("degrade", fpr * degrade_factor))
        self.throttle_gap = 3600.0 / throttle_per_hour
        self.states: OrderedDict[str, ClientState] = OrderedDict()
        self.actions: OrderedDict[str, Action] = OrderedDict()  # flagged clients only
        self.next_served: dict[str, float] = {}  # throttled clients in `actions`: when the next one is served
        self.linker = (Linker(detector.popularity_, detector.rare_key_surprisal_, min_size=min_group,
                              max_accounts=max_clients) if link else None)
        self.pooled: OrderedDict[str, ClientState] = OrderedDict()  # linked groups' traffic, by group root

    def observe(self, event: Event) -> Action:
        event = compact(event)  # a megabyte prompt is kept as its capped head and tail, in every structure
        client = event.client
        state = self._state(self.states, client)
        state.update(event)
        if event.response is not None:  # a log replayed: its events carry their answers
            self.questions.add(event)
        if state.due:
            self._decide(client, state)
        self.observed += 1
        if self.campaign_every and self.observed % self.campaign_every == 0:
            self._campaigns()
        action = self.actions.get(client, ALLOW)
        if self.linker is not None:
            group = self._observe_group(event)
            if group is not None and LEVELS.index(group.kind) > LEVELS.index(action.kind):
                action = group
        if action is ALLOW:
            return action
        if client in self.actions:
            self.actions.move_to_end(client)
        if action.kind == "throttle":
            if event.time < self.next_served.get(client, -float("inf")):
                return replace(action, served=False)
            self.next_served[client] = event.time + self.throttle_gap
        return action

    def answered(self, client: str, prompt: str, response: str) -> None:
        """`client`'s request `prompt` was answered `response` (when its completion finished): what it learned
        from its answers is what answer chaining reads. Its linked group, if any, learns it too."""
        event = compact(Event(client, 0.0, prompt, response=response))
        state = self.states.get(client)
        if state is not None:
            state.learn(event.prompt, event.response)
            self.questions.add(event)
        root = self.linker.root(client) if self.linker is not None else None
        if root is not None and root in self.pooled:
            self.pooled[root].learn(event.prompt, event.response)

    def _state(self, states: OrderedDict[str, ClientState], name: str) -> ClientState:
        """`name`'s state in `states` (a client's or a group's), made if new; the least recent evicted."""
        state = states.get(name)
        if state is None:
            state = states[name] = ClientState(seed=hash_seed(name, self.seed), popularity=self.detector.popularity_)
            if len(states) > self.max_clients:
                evicted, _ = states.popitem(last=False)
                self.questions.forget(evicted)
        else:
            states.move_to_end(name)
        return state

    def _observe_group(self, event: Event) -> Action | None:
        """Feeds the pooled traffic of the linked group `event`'s account belongs to; the group's action."""
        root, backlog = self.linker.observe(event)
        if root is None:
            return None
        pooled = self._state(self.pooled, root)
        key = ("group", root)
        size = self.linker.group_size(root)
        for e in sorted(backlog, key=lambda e: e.time):
            pooled.update(e)
            if pooled.due and size >= self.linker.min_size:
                self._decide(key, pooled, f" of a linked group of {size} accounts")
        return self.actions.get(key)

    def _decide(self, client, state: ClientState, who: str = "") -> None:
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
                    reason = f"p={p:.3g} after {state.count} requests{who}{judged}: " + ", ".join(d.unusual(features))
                    self._flag(client, Action(kind, reason, p, served=kind != "block"))
                return

    def _campaigns(self) -> None:
        """The campaign test over the kept clients (`detectors.campaign`): each member an alarming campaign
        names is degraded (answers without their reasoning), at least."""
        for campaign in find_campaigns(self.questions.candidates(self.detector.rare_key_surprisal_)):
            if not campaign["alarm"]:
                continue
            named = [m for m in campaign["members"] if m["named"]]
            for member in named:
                self.remember(member["client"], Action(
                    "degrade", f"named in a campaign of {len(named)} accounts that never ask one question twice "
                               f"(p={campaign['p_value']:.3g}, permutation; its own p={member['p_value']:.3g})",
                    member["p_value"]))

    def remember(self, client: str, action: Action) -> None:
        """Takes `client`'s verdict as given (a verdict kept outside this process: `guard.gateway.shared_state`), unless
        it already has a stronger one: levels only go up."""
        if LEVELS.index(action.kind) > LEVELS.index(self.actions.get(client, ALLOW).kind):
            self._flag(client, action)

    def _flag(self, client: str, action: Action) -> None:
        self.actions[client] = action
        self.actions.move_to_end(client)
        if action.kind != "throttle":
            self.next_served.pop(client, None)
        if len(self.actions) > self.max_flagged:
            evicted, _ = self.actions.popitem(last=False)
            self.next_served.pop(evicted, None)
