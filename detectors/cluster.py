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
import time
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterable

import numpy as np
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

from detectors.campaign import QuestionLog, find_campaigns
from detectors.detector import TrafficDetector
from detectors.events import Event
from detectors.features import LINK_AT, Popularity, by_client, task_surprisal

MASK = re.compile(r"\b[A-Z][a-z]+\b|\d+")
START_WINDOW = 60.0  # seconds between the first requests of accounts in step
TOGETHER = 3600.0  # seconds between the first requests of accounts that a network alone does not link
PACE_RATIO = 1.25  # the most one regular account's pace may be of another's, in step
TEMPLATE_OVERLAP = 0.3  # the share of two accounts' wording shapes (Jaccard) that is a common template


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
           pace_ratio: float = PACE_RATIO, template_overlap: float = TEMPLATE_OVERLAP) -> bool:
    if a.payment and a.payment == b.payment:
        return True
    shared = len(a.shapes & b.shapes)
    return bool(_linked_unpaid(a, b, bool(a.network) and a.network == b.network, shared,
                               len(a.shapes) + len(b.shapes) - shared, a.keys.isdisjoint(b.keys),
                               start_window, together, pace_ratio, template_overlap))


def _linked_unpaid(a, b, network, shared_shapes, all_shapes, disjoint_keys, start_window, together, pace_ratio,
                   template_overlap):
    """The rule for two accounts that share no payment, written once for `linked` (one pair: `a`, `b` accounts,
    the rest scalars) and for `clusters` (elementwise: `a`, `b` broadcastable columns, the rest arrays); so it
    uses operators only, which mean the same on both."""
    timing = (a.regular & b.regular & (abs(a.start - b.start) <= start_window)
              & (a.pace <= pace_ratio * b.pace) & (b.pace <= pace_ratio * a.pace))  # the larger pace within ratio
    # no shapes at all: a share of 0, not 0/0
    templates = (all_shapes > 0) & (shared_shapes / (all_shapes + (all_shapes == 0)) >= template_overlap)
    coverage = a.rare & b.rare & disjoint_keys
    votes = network * 1 + timing * 1 + templates * 1 + coverage * 1  # * 1: numpy adds booleans as "or"
    return (abs(a.start - b.start) <= together) & (votes >= 2)  # a script's accounts share it while it runs


class _Columns:
    """Accounts as arrays, for `_linked_unpaid` over blocks of pairs: wording shapes and keys as sparse
    incidence matrices (so a block's shared counts are one product), networks as integer codes (-1: none)."""

    def __init__(self, accounts: list[Account]):
        self.start = np.array([a.start for a in accounts])
        self.pace = np.array([a.pace for a in accounts])
        self.regular = np.array([a.regular for a in accounts])
        self.rare = np.array([a.rare for a in accounts])
        codes: dict[str, int] = {}
        self.network = np.array([codes.setdefault(a.network, len(codes)) if a.network else -1 for a in accounts])
        self.shapes, self.keys = (_incidence([getattr(a, name) for a in accounts]) for name in ("shapes", "keys"))
        self.n_shapes = np.asarray(self.shapes.sum(axis=1)).ravel()

    def side(self, index: np.ndarray, axis: int) -> SimpleNamespace:
        """The scalar fields of accounts `index`, as a column (axis 0) or a row (axis 1) of a block."""
        shape = (-1, 1) if axis == 0 else (1, -1)
        return SimpleNamespace(**{name: getattr(self, name)[index].reshape(shape)
                                  for name in ("start", "pace", "regular", "rare", "network", "n_shapes")})


def _incidence(sets: list[frozenset[str]]) -> csr_matrix:
    vocabulary: dict[str, int] = {}
    rows = [i for i, items in enumerate(sets) for _ in items]
    cols = [vocabulary.setdefault(item, len(vocabulary)) for items in sets for item in items]
    return csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=(len(sets), len(vocabulary)))


BLOCK_PAIRS = 4_000_000  # pairs judged at once: bounds a block's arrays (a few bytes each) whatever a bucket's size


def _block_links(columns: _Columns, mine: np.ndarray, later: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs linked without a payment among the accounts `mine`, and between them and the accounts `later`."""
    others = np.concatenate([mine, later]).astype(int)
    among_mine = np.arange(len(others)) < len(mine)  # each such pair is met twice: kept once
    found_i, found_j = [], []
    step = max(1, BLOCK_PAIRS // max(len(others), 1))
    b = columns.side(others, axis=1)
    for lo in range(0, len(mine), step):
        rows = mine[lo:lo + step]
        a = columns.side(rows, axis=0)
        shared = (columns.shapes[rows] @ columns.shapes[others].T).toarray()
        disjoint = (columns.keys[rows] @ columns.keys[others].T).toarray() == 0
        network = (a.network == b.network) & (a.network >= 0)
        hit = _linked_unpaid(a, b, network, shared, a.n_shapes + b.n_shapes - shared, disjoint, START_WINDOW,
                             TOGETHER, PACE_RATIO, TEMPLATE_OVERLAP)
        hit &= ~among_mine[None, :] | (rows[:, None] < others[None, :])
        i, j = np.nonzero(hit)
        found_i.append(rows[i])
        found_j.append(others[j])
    return np.concatenate(found_i or [np.zeros(0, int)]), np.concatenate(found_j or [np.zeros(0, int)])


def clusters(events: list[Event], min_size: int = 3, popularity: Popularity | None = None,
             rare_surprisal: float = np.inf) -> list[list[str]]:
    """Groups of at least `min_size` accounts linked by common-control evidence, in a log."""
    return link([summarize(c, mine, popularity, rare_surprisal) for c, mine in by_client(events).items()], min_size)


def link(accounts: list[Account], min_size: int = 3) -> list[list[str]]:
    """Groups of at least `min_size` of `accounts` linked by common-control evidence: the pairs `linked` links,
    found in O(accounts x candidates). Candidates come from the `Linker`'s index: only accounts in the same
    or the next start bucket can be linked by anything but a payment, and the accounts sharing a payment are
    all linked to each other (so a chain through them links them). The network index is not needed: a network
    links only with a second signal, inside the start window."""
    index = AccountIndex(TOGETHER)
    for i, account in enumerate(accounts):
        index.add(i, account)
    columns = _Columns(accounts)
    rows, cols = [], []
    for bucket, mine in index.by_start.items():
        found = _block_links(columns, np.array(mine), np.array(index.by_start.get(bucket + 1, []), dtype=int))
        rows.append(found[0])
        cols.append(found[1])
    for payers in index.by_payment.values():
        rows.append(np.array(payers[:-1], dtype=int))
        cols.append(np.array(payers[1:], dtype=int))
    rows, cols = (np.concatenate(x or [np.zeros(0, int)]) for x in (rows, cols))
    n = len(accounts)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[str]] = {}
    for account, label in zip(accounts, labels):
        groups.setdefault(int(label), []).append(account.client)
    return sorted((sorted(g) for g in groups.values() if len(g) >= min_size), key=len, reverse=True)


def judge_clusters(detector: TrafficDetector, events: list[Event], min_size: int = 3) -> list[dict]:
    """Each cluster's pooled traffic scored as one client; a flagged pool flags all its members."""
    found = clusters(events, min_size, detector.popularity_, detector.rare_key_surprisal_)
    return judge_groups(detector, found, lambda members: [e for e in events if e.client in set(members)])


def judge_groups(detector: TrafficDetector, groups: list[list[str]],
                 events_of: Callable[[list[str]], list[Event]]) -> list[dict]:
    """Each group's pooled traffic (`events_of(members)`, in time order) scored as one client."""
    out = []
    for number, members in enumerate(groups):
        pooled = [Event(f"cluster-{number}", e.time, e.prompt, e.prompt_tokens, e.response_tokens, e.endpoint)
                  for e in events_of(members)]
        verdict = detector.score(pooled)[f"cluster-{number}"]
        out.append({"cluster": number, "members": members, **verdict})
    return out


def detect_accounts(detector: TrafficDetector, accounts: Iterable[tuple[str, list[Event]]],
                    events_of: Callable[[list[str]], list[Event]],
                    min_size: int = 3) -> tuple[dict, list[dict], list[dict], dict]:
    """What `distill-guard detect` does to a log, streamed: `accounts` gives each account's events in time
    order, one at a time (from `Store.events_by_account`, say), and only a chunk of accounts' events, each
    account's summary and its question keys (`detectors.campaign`) are held; a linked group's events are read
    again through `events_of`. Returns the per-account verdicts (a member of a flagged group is flagged
    `via_cluster`; a member a campaign names carries `campaign` and its own p-value), the groups' verdicts,
    the campaigns, and the seconds spent in each stage."""
    seconds = defaultdict(float)
    summaries = []
    questions = QuestionLog(detector.popularity_)

    def timed(stage: str, iterable):  # the time spent producing each item, charged to `stage`
        iterator = iter(iterable)
        while True:
            begun = time.perf_counter()
            item = next(iterator, None)
            seconds[stage] += time.perf_counter() - begun
            if item is None:
                return
            yield item

    def summarised(stream):
        for client, mine in stream:
            begun = time.perf_counter()
            summaries.append(summarize(client, mine, detector.popularity_, detector.rare_key_surprisal_))
            for event in mine:
                questions.add(event)
            seconds["summaries"] += time.perf_counter() - begun
            yield client, mine

    begun = time.perf_counter()
    verdicts = detector.score_accounts(summarised(timed("read", accounts)))
    seconds["features_and_verdicts"] = time.perf_counter() - begun - seconds["read"] - seconds["summaries"]
    begun = time.perf_counter()
    found = link(summaries, min_size)
    seconds["clusters"] = time.perf_counter() - begun
    begun = time.perf_counter()
    groups = judge_groups(detector, found, events_of)
    for group in groups:
        for member in group["members"]:
            if group["flagged"] and not verdicts[member]["flagged"]:
                verdicts[member] |= {"flagged": True, "via_cluster": group["cluster"]}
    seconds["cluster_verdicts"] = time.perf_counter() - begun
    begun = time.perf_counter()
    campaigns = find_campaigns(questions.candidates(detector.rare_key_surprisal_))
    for number, campaign in enumerate(campaigns):
        campaign["campaign"] = number
        for member in campaign["members"]:
            if member["named"]:
                verdicts[member["client"]] |= {"campaign": number, "campaign_p_value": member["p_value"]}
    seconds["campaigns"] = time.perf_counter() - begun
    return verdicts, groups, campaigns, dict(seconds)


class AccountIndex:
    """Where to look for the accounts an account may be linked with, for the `Linker` (online) and `link`
    (offline): accounts by start bucket (`together` wide, so an account's peers within `together` are in its
    bucket or the next to either side), by network (the most recent `max_per_network` of each), by payment.
    It holds ids of any kind: the Linker's client names, `link`'s row numbers."""

    def __init__(self, together: float = TOGETHER, max_per_network: int | None = None):
        self.together = together
        self.by_start: defaultdict[int, list] = defaultdict(list)
        # the most recent accounts of each network: behind a NAT or a balancer, thousands of strangers share one
        self.by_network: defaultdict[str, deque] = defaultdict(lambda: deque(maxlen=max_per_network))
        self.by_payment: defaultdict[str, list] = defaultdict(list)

    def bucket(self, account: Account) -> int:
        return int(account.start // self.together)

    def add(self, id, account: Account) -> None:
        self.by_start[self.bucket(account)].append(id)
        if account.network:
            self.by_network[account.network].append(id)
        if account.payment:
            self.by_payment[account.payment].append(id)

    def remove(self, id, account: Account) -> None:
        for index, key in ((self.by_start, self.bucket(account)), (self.by_network, account.network),
                           (self.by_payment, account.payment)):
            if key in index and id in index[key]:  # a network's list may have dropped it already
                index[key].remove(id)
                if not index[key]:
                    del index[key]

    def candidates(self, account: Account) -> set:
        bucket = self.bucket(account)
        found = {c for b in (bucket - 1, bucket, bucket + 1) for c in self.by_start.get(b, ())}
        found.update(self.by_network.get(account.network or "", ()))
        found.update(self.by_payment.get(account.payment or "", ()))
        return found


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
        self.index = AccountIndex(together, max_per_network)  # the summarised accounts, by client name
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
            while len(self.first) > self.max_accounts:  # accounts that never send LINK_AT requests are many
                self.first.popitem(last=False)
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
        # sorted: which group absorbs which must not depend on the process's string hashing
        return sorted(self.index.candidates(account))

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
        self.index.add(account.client, account)

    def _evict(self) -> None:
        while len(self.first) > self.max_accounts:
            self.first.popitem(last=False)
        while len(self.unlinked) > self.max_accounts // 10:  # those a new account could still meet in step
            self.unlinked.popitem(last=False)
        while len(self.summaries) > self.max_accounts:
            gone, account = self.summaries.popitem(last=False)
            self.index.remove(gone, account)
        while len(self.parent) > self.max_accounts:
            gone, group = self.parent.popitem(last=False)
            self.members[group].discard(gone)
            if not self.members[group]:
                del self.members[group]
