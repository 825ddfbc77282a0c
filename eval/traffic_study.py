"""The rate-pattern detector's validation: per-account detection on fresh seeds, swarms, benign cost, and
protection measured by real distillation through the monitor.

    distill-guard study traffic --out runs/traffic [--seeds 3] [--budget 2000] [--attack-seeds 3]
        [--students 'eval/results/redaction-{strategy}/students']

1. Fit `TrafficDetector` on simulated benign traffic (seed 0), with and without embedding features.
2. Score fresh seeds (never used for fitting): per attacker kind the share of accounts flagged (TPR) and the
   median number of its requests before the flag; per benign persona the share flagged (FPR); sybil
   accounts flagged individually and through clustering.
3. Benign cost: the share of benign requests the online monitor refuses (throttle or block) on fresh seeds.
4. Protection: `evaluate` with the `monitor` defence in front of teacher-a: the naive attacker's harvest
   sent at the scripted pace (2 s), at the slow-rate pace (90 s), from a sybil swarm of 10 and of 100
   accounts, and hidden in a legitimate account's traffic (hydra); and the decomposition attacker.
   `--students` names the cache of trained students per attacker strategy: pointed at the redaction grid's,
   the undefended students (and any harvest through the monitor that matches one) are not trained again.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from detectors.cluster import judge_clusters
from detectors.detector import TrafficDetector
from detectors.monitor import Monitor
from eval.attack import BENIGN_REPLAY, AttackConfig, evaluate, lab_parts
from eval.reference import load_teacher
from eval.reference.world import reference_task
from eval.report import write_study
from eval.student import StudentConfig
from eval.traffic import ATTACKERS, BENIGN, BENIGN_POPULATION, TrafficShape, simulate
from guard.defenses import DefenseParts

ATTACK_MIX = {**{kind: 10 for kind in ATTACKERS if kind != "sybil"}, "sybil": 2}  # per seed, beside the benign


def detection(detector: TrafficDetector, seeds: list[int], test_mix: dict[str, int]) -> dict:
    per_kind = defaultdict(lambda: {"accounts": 0, "flagged": 0, "queries_to_flag": [], "via_cluster": 0})
    for seed in seeds:
        traffic, labels = simulate(test_mix, days=3, seed=seed)
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


def benign_cost(detector: TrafficDetector, seeds: list[int], benign_mix: dict[str, int]) -> dict:
    """The share of benign requests the online monitor refuses, and the share it serves without reasoning.
    Each seed's traffic is replayed through a fresh monitor."""
    refused = degraded = total = 0
    for seed in seeds:
        monitor = Monitor(detector)
        traffic, _ = simulate(benign_mix, days=3, seed=seed)
        for event in traffic:
            action = monitor.observe(event)
            refused += not action.served
            degraded += action.served and action.kind != "allow"
            total += 1
    return {"requests": total, "refused_share": refused / total, "degraded_share": degraded / total}


# The harvester's traffic shape through the monitor, per attacker kind of the simulator
SHAPES = {"naive": TrafficShape(), "slow": TrafficShape(pace=90), "sybil of 10": TrafficShape(accounts=10),
          "sybil of 100": TrafficShape(accounts=100), "hydra": TrafficShape(pace=60, cover=3)}


def protection(out: Path, budget: int, seeds: int, progress: bool, steps: int | None = None,
               eval_items: int | None = None, replay_mix: dict[str, int] = BENIGN_REPLAY,
               detector: TrafficDetector | None = None, students: str | None = None) -> list[dict]:
    """Real distillation through the monitor: the naive attacker's queries in each traffic shape, and the
    decomposition attacker's at the scripted pace; protection against the same attacker undefended. What the
    monitor costs benign users comes from one day of `replay_mix`'s traffic (a seed the detector never saw)
    replayed through it, carrying the held-out items. `students` is a cache directory with `{strategy}` in
    its name, shared with other studies (default: one per strategy under `out`, shared by its shapes)."""
    teacher, task = load_teacher("reference"), reference_task()
    task.eval_items = task.eval_items[:eval_items]
    benign, _ = simulate(replay_mix, days=1, seed=101)
    parts = lab_parts(["monitor"]) if detector is None else DefenseParts(detector=detector)
    rows = []
    for strategy, shapes in (("naive", SHAPES), ("decompose", {"decompose": TrafficShape()})):
        cache = students.format(strategy=strategy) if students else out / f"protection-{strategy}" / "students"
        for index, (name, shape) in enumerate(shapes.items()):
            attack = AttackConfig(strategy=strategy, student=StudentConfig(mode="sft", steps=steps), traffic=shape)
            report = evaluate(teacher, task, ["none", "monitor"], attack, [budget], seeds,
                              out / f"protection-{strategy}" / name.replace(" ", "-"), progress=progress,
                              parts=parts, benign=benign, students=cache)
            for r in report["rows"]:
                if r["defense"] == "monitor":
                    rows.append({**r, "shape": name})
                elif index == 0:  # the undefended attacker once: its harvest ignores the traffic shape
                    rows.append({**r, "shape": "undefended"})
    return rows


def markdown(report: dict) -> str:
    variants = [v for v in VARIANTS if v in report]
    lines = ["| traffic | accounts | " + " | ".join(f"flagged, {v} [95% CI]" for v in variants) +
             " | via cluster | median requests before the flag |", "|---|---|" + "---|" * (len(variants) + 2)]
    first = report[variants[0]]["detection"]
    for kind in [*ATTACKERS, *BENIGN, "all benign"]:
        if kind not in first:
            continue
        cells = [f"{report[v]['detection'][kind]['flagged_share']:.1%} [{report[v]['detection'][kind]['flagged_ci95'][0]:.1%}, "
                 f"{report[v]['detection'][kind]['flagged_ci95'][1]:.1%}]" for v in variants]
        median = first[kind]["median_queries_to_flag"]
        lines.append(f"| {kind} | {first[kind]['accounts']} | " + " | ".join(cells) +
                     f" | {first[kind]['flagged_via_cluster_share']:.0%} | {'—' if median is None else f'{median:.0f}'} |")
    lines += ["", "| benign cost | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for measure in ("refused_share", "degraded_share"):
        lines.append(f"| {measure.replace('_', ' ')} of benign requests | " +
                     " | ".join(f"{report[v]['benign_cost'][measure]:.2%}" for v in variants) + " |")
    lines += ["", "| attacker | defence | queries | student after | transfer τ [95% CI] | protection [95% CI] |",
              "|---|---|---|---|---|---|"]
    for r in report.get("protection", []):
        low, high = r["transfer"]["ci95"]
        prot = r.get("protection")
        prot_text = "—" if not prot else f"{prot['mean']:.2f} [{prot['ci95'][0]:.2f}, {prot['ci95'][1]:.2f}]"
        lines.append(f"| {r['attack']} ({r['shape']}) | {r['defense']} | {r['queries']} | {r['student_after_acc']:.3f} | "
                     f"{r['transfer']['mean']:.2f} [{low:.2f}, {high:.2f}] | {prot_text} |")
    return "\n".join(lines)


VARIANTS = {"timing+content": False, "with embeddings": True}


def main(out: str, seeds: list[int], budget: int, attack_seeds: int, fit_mix: dict[str, int] = BENIGN_POPULATION,
         variants: tuple[str, ...] = tuple(VARIANTS), steps: int | None = None, eval_items: int | None = None,
         progress: bool = True, replay_mix: dict[str, int] = BENIGN_REPLAY, students: str | None = None) -> dict:
    start, out_dir = time.perf_counter(), Path(out)
    benign, _ = simulate(fit_mix, days=3, seed=0)
    test_mix = {**fit_mix, **ATTACK_MIX}
    report: dict = {"fit": fit_mix, "test": test_mix, "seeds": seeds, "benign_replay": replay_mix}
    detectors = {}
    for name in variants:
        detector = detectors[name] = TrafficDetector(target_fpr=0.01, use_embeddings=VARIANTS[name]).fit(benign)
        report[name] = {"detection": detection(detector, seeds, test_mix),
                        "benign_cost": benign_cost(detector, seeds, fit_mix)}
        print(name, json.dumps(report[name], indent=1), flush=True)
    if attack_seeds:
        # the monitor defence runs the timing+content detector, fitted on the study's benign traffic
        monitor_detector = detectors.get("timing+content") or TrafficDetector(use_embeddings=False).fit(benign)
        report["protection"] = protection(out_dir, budget, attack_seeds, progress, steps, eval_items, replay_mix,
                                          monitor_detector, students)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_study(out_dir, report, markdown(report))
    return report
