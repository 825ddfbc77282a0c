"""Cross-account clustering: a sybil swarm spreads one harvest over accounts that each look clean.

Accounts are linked by evidence of common control: a shared payment fingerprint, the same /24 network,
synchronised timing (first request within a minute and the same pace), and shared prompt templates
(prompts that are the same once names and numbers are masked). One weak signal is common among benign
customers (two batch jobs may use one template; colleagues share an office network), so an edge needs a
shared payment fingerprint, or two of the other three. Connected groups of at least `min_size` accounts are
then judged as one client: their pooled traffic goes through the fitted detector, and if the pool is
flagged every member is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from detectors.detector import TrafficDetector
from detectors.events import Event
from detectors.features import by_client

MASK = re.compile(r"\b[A-Z][a-z]+\b|\d+")


@dataclass
class Account:
    client: str
    payment: str | None
    network: str | None
    start: float
    pace: float  # median seconds between requests
    shapes: frozenset[str]


def summarize(client: str, events: list[Event], sample: int = 64) -> Account:
    times = np.array([e.time for e in events])
    ip = events[0].ip
    shapes = frozenset(MASK.sub("#", e.prompt) for e in events[:sample])
    return Account(client, events[0].payment, ip.rsplit(".", 1)[0] if ip and "." in ip else ip, float(times[0]),
                   float(np.median(np.diff(times))) if len(times) > 1 else float("inf"), shapes)


def linked(a: Account, b: Account, start_window: float = 60.0, pace_ratio: float = 1.25,
           template_overlap: float = 0.3) -> bool:
    if a.payment and a.payment == b.payment:
        return True
    network = bool(a.network) and a.network == b.network
    timing = abs(a.start - b.start) <= start_window and max(a.pace, b.pace) <= pace_ratio * min(a.pace, b.pace)
    union = len(a.shapes | b.shapes)
    templates = union > 0 and len(a.shapes & b.shapes) / union >= template_overlap
    return network + timing + templates >= 2


def clusters(events: list[Event], min_size: int = 3) -> list[list[str]]:
    """Groups of at least `min_size` accounts linked by common-control evidence."""
    accounts = [summarize(c, mine) for c, mine in by_client(events).items()]
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
    for number, members in enumerate(clusters(events, min_size)):
        pooled = [Event(f"cluster-{number}", e.time, e.prompt, e.prompt_tokens, e.response_tokens, e.endpoint)
                  for e in events if e.client in set(members)]
        verdict = detector.score(pooled)[f"cluster-{number}"]
        out.append({"cluster": number, "members": members, **verdict})
    return out
