"""Offline `detect` at scale: an audit log of many accounts, read, featurised, linked and judged.

    OMP_NUM_THREADS=1 python -m eval.benchmarks.detect_scale --accounts 10000 --events 1000000

The log is written into the gateway's own SQLite schema (the lab's simulated traffic: its benign population,
day after day, and a few small harvesting swarms), then judged as `distill-guard detect --log sqlite:///...`
judges it (`detectors.cluster.detect_accounts` over `Store.events_by_account`). Reported: wall time per stage
and the process's peak RSS after writing the log and after detecting (what detect adds shows as the growth).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sqlite3
import tempfile
import time
from pathlib import Path

from detectors.cluster import detect_accounts
from eval.benchmarks import write_result
from eval.traffic import BENIGN_POPULATION, DAY, lab_detector, simulate
from guard.gateway.store import INSERT_AUDIT, SQLiteStore, open_store

PER_ACCOUNT_DAY = 71.0  # requests a day of the lab's benign population makes per account, on average


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_log(path: Path, accounts: int, events: int, swarms: int = 5, days: int = 7, seed: int = 0) -> dict:
    """About `accounts` accounts making about `events` requests, starting over `days` days: blocks of the lab's
    benign population (each block one simulated stretch of a day), `swarms` of them with a swarm of 20
    accounts x 20 questions. Returns what was written."""
    SQLiteStore(path).close()  # the schema, as the gateway creates it
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")  # a bulk load of a scratch log: durability is not what is measured
    per_block = sum(BENIGN_POPULATION.values())
    blocks = max(1, math.ceil(accounts / per_block))
    scale = accounts / (blocks * per_block)
    population = {kind: max(1, round(n * scale)) for kind, n in BENIGN_POPULATION.items()}
    span = events / accounts / PER_ACCOUNT_DAY  # days each block's accounts are active: corrected as blocks come
    written = {"accounts": 0, "events": 0, "swarm_accounts": 0}
    for block in range(blocks):
        swarm = {"swarm": 1} if block * swarms // blocks != (block + 1) * swarms // blocks else {}
        traffic, labels = simulate({**population, **swarm}, days=span, seed=seed + block, attack_budget=400,
                                   swarm_accounts=20, start=1_767_225_600.0 + (block % days) * DAY)
        db.execute("BEGIN")
        db.executemany(INSERT_AUDIT, ((f"{block}-{i}", e.client, e.time, e.ip, e.payment, e.endpoint, e.prompt, None,
                                       e.prompt_tokens, e.response_tokens, "{}", None, 200)
                                      for i, e in enumerate(traffic)))
        db.execute("COMMIT")
        clients = {e.client for e in traffic}  # a quiet simulated user may have sent nothing
        written["accounts"] += len(clients)
        written["events"] += len(traffic)
        written["swarm_accounts"] += sum(labels[c] == "swarm" for c in clients)
        # batch jobs and evaluation harnesses send what they send whatever the span: aim the rest at the target
        span *= min(4.0, max(0.25, events / blocks / max(len(traffic), 1)))
    db.close()
    return written


def main(accounts: int = 10_000, events: int = 1_000_000, quick: bool = False, detector=None,
         out_dir: str | Path | None = None) -> dict:
    seconds = {}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "audit.sqlite"
        begun = time.perf_counter()
        written = write_log(path, accounts, events)
        seconds["write_log"] = time.perf_counter() - begun
        rss_after_write = peak_rss_mib()
        begun = time.perf_counter()
        detector = detector or lab_detector()  # what `detect --lab` fits
        seconds["fit"] = time.perf_counter() - begun
        begun = time.perf_counter()
        with open_store(f"sqlite:///{path}") as store:
            verdicts, groups, _, stages = detect_accounts(detector, store.events_by_account(), store.events_of)
        seconds["detect"] = time.perf_counter() - begun
    swarm_linked = sum(m.startswith("swarm-") for g in groups for m in g["members"])
    result = {"quick": quick, "asked": {"accounts": accounts, "events": events}, "written": written,
              "seconds": {**seconds, "detect_stages": stages},
              "peak_rss_mib": {"after_writing_log": rss_after_write, "after_detect": peak_rss_mib()},
              "found": {"accounts": len(verdicts), "flagged": sum(v["flagged"] for v in verdicts.values()),
                        "clusters": len(groups), "swarm_accounts_in_clusters": swarm_linked,
                        "accounts_in_clusters": sum(len(g["members"]) for g in groups)}}
    print(json.dumps(result, indent=2))
    if not quick:
        print("wrote", write_result("detect_scale", result, *([out_dir] if out_dir else [])))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="a few hundred accounts, nothing written: a smoke test")
    args = parser.parse_args()
    main(*((300, 30_000) if args.quick else (args.accounts, args.events)), quick=args.quick)
