"""Cross-account linking: a swarm spreads one harvest over accounts that each look clean.

Accounts are linked by evidence of common control, read from each account's first `LINK_AT` requests:
- a shared payment fingerprint (enough on its own);
- the same /24 network;
- synchronised timing: first requests within `start_window` seconds, at the same regular pace (a script's);
- shared wording templates: prompts that are the same once names and numbers are masked;
- joint coverage: both accounts ask about things benign users rarely ask about (their keys' surprisal under
  the benign population's popularity is above what 75% of benign task askers show), and never about the same
  thing, as the parts of one harvest split between accounts do, where people's interests overlap on the
  popular.
Each weak signal alone is common among benign customers (colleagues share an office network, two batch jobs
may share a template, two evaluation customers both ask about everything), so an edge needs a shared
payment fingerprint or two of the other four; and the last three count only between accounts that started
within `TOGETHER` of each other (two evaluation customers using one harness, days apart, are not a swarm). A connected group of at least `min_size` accounts is judged
as one client: its pooled traffic goes through the fitted detector.

`Linker` does this online, one request at a time, for the monitor (and so for the gateway); `clusters` and
`judge_clusters` do it on a log.
"""

from __future__ import annotations

import re
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from detectors.detector import TrafficDetector
from detectors.events import Event
from detectors.features import LINK_AT, Popularity, by_client, task_surprisal

MASK = re.compile(r"\b[A-Z][a-z]+\b|\d+")
START_WINDOW = 60.0  # seconds between the first requests of accounts in step
TOGETHER = 3600.0  # seconds between the first requests of accounts that a network alone does not link


@dataclass
class Account:
    client: str
    payment: str | None
    network: str | None
    start: float
    pace: float  # median seconds between requests
    regular: bool  # a script's clock: gaps that vary by less than half their mean
    shapes: frozenset[str]
    keys: frozenset[str]
    rare: bool  # asks about what benign users rarely do (see `linked`)


def summarize(client: str, events: list[Event], popularity: Popularity | None = None,
              rare_surprisal: float = np.inf) -> Account:
    """An account from its first requests (`LINK_AT` of them are enough)."""
    events = events[:LINK_AT]
    times = np.array([e.time for e in events])
    gaps = np.diff(times)
    ip = events[0].ip
    keys = frozenset(popularity.key(e.prompt)[0] for e in events) if popularity is not None else frozenset()
    surprisal = task_surprisal([e.prompt for e in events], popularity) if popularity is not None else None
    rare = surprisal is not None and surprisal >= rare_surprisal
    return Account(client, events[0].payment, ip.rsplit(".", 1)[0] if ip and "." in ip else ip, float(times[0]),
                   float(np.median(gaps)) if len(gaps) else float("inf"),
                   len(gaps) > 1 and gaps.std() < 0.5 * gaps.mean(),
                   frozenset(MASK.sub("#", e.prompt) for e in events), keys, rare)


def linked(a: Account, b: Account, start_window: float = START_WINDOW, together: float = TOGETHER,
           pace_ratio: float = 1.25, template_overlap: float = 0.3) -> bool:
    if a.payment and a.payment == b.payment:
        return True
    network = bool(a.network) and a.network == b.network
    if abs(a.start - b.start) > together:  # what a script's accounts share, they share while it runs
        return False
    timing = (a.regular and b.regular and abs(a.start - b.start) <= start_window
              and max(a.pace, b.pace) <= pace_ratio * min(a.pace, b.pace))
    union = len(a.shapes | b.shapes)
    templates = union > 0 and len(a.shapes & b.shapes) / union >= template_overlap
    coverage = a.rare and b.rare and not a.keys & b.keys
    return network + timing + templates + coverage >= 2


def clusters(events: list[Event], min_size: int = 3, popularity: Popularity | None = None,
             rare_surprisal: float = np.inf) -> list[list[str]]:
    """Groups of at least `min_size` accounts linked by common-control evidence, in a log."""
    accounts = [summarize(c, mine, popularity, rare_surprisal) for c, mine in by_client(events).items()]
    rows, cols = [], []
    for i in range(len(accounts)):
        for j in range(i + 1, len(accounts)):
            if linked(accounts[i], accounts[j]):
                rows.append(i)
                cols.append(j)
    n = len(accounts)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[str]] = {}
    for account, label in zip(accounts, labels):
        groups.setdefault(int(label), []).append(account.client)
    return sorted((sorted(g) for g in groups.values() if len(g) >= min_size), key=len, reverse=True)


def judge_clusters(detector: TrafficDetector, events: list[Event], min_size: int = 3) -> list[dict]:
    """Each cluster's pooled traffic scored as one client; a flagged pool flags all its members."""
    out = []
    found = clusters(events, min_size, detector.popularity_, detector.rare_key_surprisal_)
    for number, members in enumerate(found):
        pooled = [Event(f"cluster-{number}", e.time, e.prompt, e.prompt_tokens, e.response_tokens, e.endpoint)
                  for e in events if e.client in set(members)]
        verdict = detector.score(pooled)[f"cluster-{number}"]
        out.append({"cluster": number, "members": members, **verdict})
    return out


class Linker:
    """Links accounts online, as their requests arrive. Each account is summarised once, at its `LINK_AT`-th request, and compared with
    the accounts that started within `together` of it (a network or a payment links accounts whenever they
    started, so those are indexed too). When accounts are linked, the events their group's pooled traffic
    has not seen (their first requests) come with the group. Memory is bounded: at most `max_accounts`
    accounts' summaries, first requests (a tenth of that once summarised) and group memberships, least
    recently used evicted; and each account is compared with at most `max_per_network` accounts of its network
    (the most recent), so that many strangers behind one address cost each new one a bounded number of
    comparisons.

    A group is named once, when it forms, and keeps its name as it grows and as its members are evicted (the
    monitor keys the group's pooled traffic and verdict by it); its members are kept as a set, so its size is
    always the number of its members still kept. Groups merge smaller into larger, so each account is renamed
    at most log2(max_accounts) times."""

    def __init__(self, popularity: Popularity, rare_surprisal: float, together: float = TOGETHER,
                 min_size: int = 3, max_accounts: int = 100_000, max_per_network: int = 256):
        self.popularity, self.rare_surprisal = popularity, rare_surprisal
        self.together, self.min_size, self.max_accounts = together, min_size, max_accounts
        self.first: OrderedDict[str, list[Event]] = OrderedDict()  # accounts not yet summarised
        self.unlinked: OrderedDict[str, list[Event]] = OrderedDict()  # summarised, in no group: first requests
        self.summaries: OrderedDict[str, Account] = OrderedDict()
        self.by_start: defaultdict[int, list[str]] = defaultdict(list)  # start bucket -> accounts
        # the most recent accounts of each network: behind a NAT or a balancer, thousands of strangers share one
        self.by_network: defaultdict[str, deque[str]] = defaultdict(lambda: deque(maxlen=max_per_network))
        self.by_payment: defaultdict[str, list[str]] = defaultdict(list)
        self.parent: OrderedDict[str, str] = OrderedDict()  # each linked account's group (least recent first)
        self.members: dict[str, set[str]] = {}  # each group's accounts still kept
        self.groups_formed = 0

    def root(self, client: str) -> str | None:
        """The name of the group `client` is linked into; None when it is in none."""
        return self.parent.get(client)

    def group_size(self, root: str) -> int:
        return len(self.members.get(root, ()))

    def observe(self, event: Event) -> tuple[str | None, list[Event]]:
        """The root of the linked accounts `event`'s account is one of (None while it is linked to none), and
        what their pooled traffic has not seen yet: this event, or, as the account is linked, its first
        requests. Whether the group is big enough to judge is `group_size(root) >= min_size`."""
        client = event.client
        if client in self.summaries:
            self.summaries.move_to_end(client)
            if client not in self.parent:
                return None, []
            self.parent.move_to_end(client)
            return self.root(client), [event]
        first = self.first.setdefault(client, [])
        self.first.move_to_end(client)
        first.append(event)
        if len(first) < LINK_AT:
            return None, []
        del self.first[client]
        account = summarize(client, first, self.popularity, self.rare_surprisal)
        self.unlinked[client] = first
        joined = self._link(account)
        self._remember(account)
        self._evict()
        if not joined:
            return None, []
        return self.root(client), [e for c in joined for e in self.unlinked.pop(c, [])]

    def _candidates(self, account: Account) -> list[str]:
        bucket = int(account.start // self.together)
        found = {c for b in (bucket - 1, bucket, bucket + 1) for c in self.by_start.get(b, ())}
        found.update(self.by_network.get(account.network or "", ()))
        found.update(self.by_payment.get(account.payment or "", ()))
        return sorted(found)  # which group absorbs which must not depend on the process's string hashing

    def _link(self, account: Account) -> list[str]:
        """Links `account` to the accounts it is linked with; those that were in no group before."""
        joined = []
        for other in self._candidates(account):
            summary = self.summaries.get(other)
            if summary is not None and linked(account, summary, together=self.together):
                joined += [c for c in (account.client, other) if c not in self.parent and c not in joined]
                self._union(account.client, other)
        return joined

    def _union(self, a: str, b: str) -> None:
        for c in (a, b):
            if c not in self.parent:  # a group of its own, under a name no evicted group can still hold
                self.parent[c] = name = f"group-{self.groups_formed}"
                self.members[name] = {c}
                self.groups_formed += 1
        ra, rb = self.parent[a], self.parent[b]
        if ra == rb:
            return
        if len(self.members[ra]) < len(self.members[rb]):
            ra, rb = rb, ra
        for c in self.members[rb]:
            self.parent[c] = ra  # an existing key: its place in the eviction order stays
        self.members[ra] |= self.members.pop(rb)

    def _remember(self, account: Account) -> None:
        self.summaries[account.client] = account
        self.by_start[int(account.start // self.together)].append(account.client)
        if account.network:
            self.by_network[account.network].append(account.client)
        if account.payment:
            self.by_payment[account.payment].append(account.client)

    def _evict(self) -> None:
        while len(self.first) > self.max_accounts:
            self.first.popitem(last=False)
        while len(self.unlinked) > self.max_accounts // 10:  # those a new account could still meet in step
            self.unlinked.popitem(last=False)
        while len(self.summaries) > self.max_accounts:
            gone, account = self.summaries.popitem(last=False)
            for index, key in ((self.by_start, int(account.start // self.together)),
                               (self.by_network, account.network), (self.by_payment, account.payment)):
                if key in index and gone in index[key]:  # a network's list may have dropped it already
                    index[key].remove(gone)
                    if not index[key]:
                        del index[key]
        while len(self.parent) > self.max_accounts:
            gone, group = self.parent.popitem(last=False)
            self.members[group].discard(gone)
            if not self.members[group]:
                del self.members[group]
