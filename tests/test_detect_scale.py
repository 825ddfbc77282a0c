"""Offline detect at scale: the bucketed linking finds exactly the pairwise clusters, and the benchmark runs."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from detectors.cluster import TOGETHER, link, linked, summarize
from detectors.features import by_client
from eval.traffic import simulate


def pairwise_clusters(accounts, min_size):
    """The O(N^2) reference: every pair through `linked`."""
    pairs = [(i, j) for i, j in itertools.combinations(range(len(accounts)), 2) if linked(accounts[i], accounts[j])]
    rows, cols = zip(*pairs) if pairs else ((), ())
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(accounts), len(accounts)))
    _, labels = connected_components(graph, directed=False)
    groups = {}
    for account, label in zip(accounts, labels):
        groups.setdefault(label, []).append(account.client)
    return sorted((sorted(g) for g in groups.values() if len(g) >= min_size), key=len, reverse=True)


def test_bucketed_linking_finds_the_pairwise_clusters(benign_detector):
    # a few hundred accounts of the lab's traffic over two days (accounts in many start buckets, some a day
    # apart), with a swarm (linked by timing and wording) and a sybil (one payment, one network)
    traffic, labels = simulate({"human": 60, "power": 15, "batch": 40, "student": 120, "evaluator": 40, "swarm": 1,
                                "sybil": 1}, days=2, seed=5, swarm_accounts=30)
    accounts = [summarize(c, mine, benign_detector.popularity_, benign_detector.rare_key_surprisal_)
                for c, mine in by_client(traffic).items()]
    assert len(accounts) > 300
    # the swarm moved to start across an hour's boundary, so that links between start buckets are compared too
    swarm = {c for c, kind in labels.items() if kind == "swarm"}
    middle = np.median([a.start for a in accounts if a.client in swarm])
    shift = np.ceil(middle / TOGETHER) * TOGETHER - middle
    accounts = [replace(a, start=a.start + shift) if a.client in swarm else a for a in accounts]
    # and a human paying with the sybil's card, a day from it: linked by the payment alone
    card = next(a.payment for a in accounts if labels[a.client] == "sybil")
    human = next(a for a in accounts if labels[a.client] == "human" and a.start > middle + 86_400)
    accounts = [replace(a, payment=card) if a is human else a for a in accounts]
    # in an order other than by start, where a later bucket's account may come first
    accounts = [accounts[i] for i in np.random.default_rng(0).permutation(len(accounts))]
    buckets = {a.client: a.start // TOGETHER for a in accounts}
    assert any(buckets[a.client] != buckets[b.client] and linked(a, b) for a, b in itertools.combinations(accounts, 2))
    for min_size in (2, 3):
        expected = pairwise_clusters(accounts, min_size)
        assert link(accounts, min_size) == expected
    assert sum(len(swarm & set(g)) for g in expected) >= 10  # the comparison covers real links, not only empties
    assert any(human.client in g for g in expected)


def test_the_detect_scale_benchmark_runs_quick(benign_detector):
    from eval.benchmarks.detect_scale import main

    result = main(300, 30_000, quick=True, detector=benign_detector)
    assert result["found"]["accounts"] == result["written"]["accounts"] > 100
    assert set(result["seconds"]["detect_stages"]) == {"read", "summaries", "features_and_verdicts", "clusters",
                                                        "cluster_verdicts", "campaigns"}
    assert result["peak_rss_mib"]["after_detect"] > 0


def test_sqlite_and_postgres_stream_the_log_account_by_account_alike(tmp_path, postgres_url):
    """What `detect --log URL` reads, from both stores: each account's events in time order, one account at a
    time, and a linked group's events together (PostgreSQL through its server-side cursor)."""
    from guard.gateway.store import AuditRecord, PostgresStore, SQLiteStore

    records = [AuditRecord(f"r{n}", f"acct-{n % 3}", 1_767_225_600.0 + (n * 7919) % 50, f"question {n}",
                           ip=f"10.0.{n % 3}.1") for n in range(30)]
    read = {}
    for name, store in (("sqlite", SQLiteStore(tmp_path / "audit.db")), ("postgres", PostgresStore(postgres_url))):
        for record in records:
            store.log(record)
        read[name] = ([(account, [(e.time, e.prompt) for e in events])
                       for account, events in store.events_by_account()],
                      [(e.client, e.time) for e in store.events_of(["acct-0", "acct-2"])])
        store.close()
    accounts, group = read["sqlite"]
    assert [a for a, _ in accounts] == ["acct-0", "acct-1", "acct-2"]
    assert all([t for t, _ in read_] == sorted(t for t, _ in read_) for _, read_ in accounts)
    assert sum(len(read_) for _, read_ in accounts) == 30
    assert len(group) == 20 and [t for _, t in group] == sorted(t for _, t in group)
    assert read["postgres"] == read["sqlite"]
