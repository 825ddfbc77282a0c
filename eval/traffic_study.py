"""The rate-pattern detector's validation: per-account detection on fresh seeds, swarms, benign cost, and
protection measured by real distillation through the monitor.

    python -m eval.traffic_study --out runs/traffic [--seeds 3] [--budget 2000] [--attack-seeds 3]

1. Fit `TrafficDetector` on simulated benign traffic (seed 0), with and without embedding features.
2. Score fresh seeds (never used for fitting): per attacker kind the share of accounts flagged (TPR) and the
   median number of its requests before the flag; per benign persona the share flagged (FPR); sybil
   accounts flagged individually and through clustering.
3. Benign cost: the share of benign requests the online monitor refuses (throttle or block) on fresh seeds.
4. Protection: `evaluate` with the `monitor` defence in front of teacher-a, for the naive attacker at the
   scripted pace (2 s) and the slow-rate pace (90 s), and for the decomposition attacker.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from detectors.cluster import judge_clusters
from detectors.detector import TrafficDetector
from detectors.monitor import Monitor
from detectors.simulate import ATTACKERS, BENIGN, BENIGN_POPULATION, simulate
from eval.attack import AttackConfig, evaluate
from eval.reference.world import reference_task
from guard.teacher import load_teacher

FIT_MIX = BENIGN_POPULATION
TEST_MIX = {**FIT_MIX, **{kind: 10 for kind in ATTACKERS if kind != "sybil"}, "sybil": 2}


def detection(detector: TrafficDetector, seeds: list[int]) -> dict:
    per_kind = defaultdict(lambda: {"accounts": 0, "flagged": 0, "queries_to_flag": [], "via_cluster": 0})
    for seed in seeds:
        traffic, labels = simulate(TEST_MIX, days=3, seed=seed)
        verdicts = detector.score(traffic)
        for group in judge_clusters(detector, traffic):
            for member in group["members"]:
                verdicts[member]["cluster_flagged"] = group["flagged"]
        for client, v in verdicts.items():
            k = per_kind[labels[client]]
            k["accounts"] += 1
            k["flagged"] += v["flagged"]
            k["via_cluster"] += bool(v.get("cluster_flagged"))
            if v["queries_to_flag"] is not None:
                k["queries_to_flag"].append(v["queries_to_flag"])
    benign = [per_kind[kind] for kind in BENIGN if kind in per_kind]
    per_kind["all benign"] = {"accounts": sum(k["accounts"] for k in benign), "flagged": sum(k["flagged"] for k in benign),
                              "via_cluster": sum(k["via_cluster"] for k in benign),
                              "queries_to_flag": [q for k in benign for q in k["queries_to_flag"]]}
    return {kind: {"accounts": k["accounts"], "flagged_share": k["flagged"] / k["accounts"],
                   "flagged_ci95": list(binomtest(k["flagged"], k["accounts"]).proportion_ci()),
                   "flagged_via_cluster_share": k["via_cluster"] / k["accounts"],
                   "median_queries_to_flag": float(np.median(k["queries_to_flag"])) if k["queries_to_flag"] else None}
            for kind, k in sorted(per_kind.items())}


def benign_cost(detector: TrafficDetector, seeds: list[int]) -> dict:
    """The share of benign requests the online monitor refuses, and the share it serves without reasoning.
    Each seed's traffic is replayed through a fresh monitor."""
    refused = degraded = total = 0
    for seed in seeds:
        monitor = Monitor(detector)
        traffic, _ = simulate(FIT_MIX, days=3, seed=seed)
        for event in traffic:
            action = monitor.observe(event)
            refused += not action.served
            degraded += action.served and action.kind != "allow"
            total += 1
    return {"requests": total, "refused_share": refused / total, "degraded_share": degraded / total}


def protection(out: Path, budget: int, seeds: int, progress: bool) -> list[dict]:
    teacher, task = load_teacher("reference"), reference_task()
    rows = []
    for strategy, defenses in (("naive", ["monitor", "monitor:90"]), ("decompose", ["monitor"])):
        report = evaluate(teacher, task, ["none", *defenses], AttackConfig(strategy=strategy), [budget], seeds,
                          out / f"protection-{strategy}", progress=progress)
        rows += report["rows"]
    return rows


def main(out: str, seeds: list[int], budget: int, attack_seeds: int, progress: bool = True) -> dict:
    start, out_dir = time.perf_counter(), Path(out)
    benign, _ = simulate(FIT_MIX, days=3, seed=0)
    report: dict = {"fit": FIT_MIX, "test": TEST_MIX, "seeds": seeds}
    for name, use_embeddings in (("timing+content", False), ("with embeddings", True)):
        detector = TrafficDetector(target_fpr=0.01, use_embeddings=use_embeddings).fit(benign)
        report[name] = {"detection": detection(detector, seeds), "benign_cost": benign_cost(detector, seeds)}
        print(name, json.dumps(report[name], indent=1), flush=True)
    report["protection"] = protection(out_dir, budget, attack_seeds, progress)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/traffic")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--attack-seeds", type=int, default=3)
    args = parser.parse_args()
    main(args.out, list(range(1, args.seeds + 1)), args.budget, args.attack_seeds)
