"""The traffic detector's validation: online detection through the monitor (linking included) on fresh
seeds, per attacker and per benign kind, same-domain users and evaluation customers among them; which
features carry the signal (ablation); and protection measured by real distillation through the monitor.

    distill-guard study traffic --out runs/traffic [--seeds 3] [--budget 2000] [--attack-seeds 3]
        [--students 'eval/results/redaction-{strategy}/students']

1. Fit `TrafficDetector` on simulated benign traffic (seed 0), with and without embedding features.
2. Replay fresh seeds (never used for fitting) through a fresh `Monitor` each, as the gateway would: per
   attacker kind the share of accounts blocked (TPR), through a linked group or on their own, after how
   many of their requests, and how many requests were served to them; per benign kind the share blocked
   (FPR) and the share of its requests refused or served degraded.
3. Ablation: the same replay with each feature group, and each extraction feature, left out (and the
   features left out by default put back), and with the answer-chaining test (off by default).
5. Headline: the timing+content detector on `HELD_OUT` traffic, a seed never used while the features, the
   chain test and their thresholds were chosen (seeds 1-3 were).
4. Protection: `evaluate` with the `monitor` defence in front of teacher-a: the naive attacker's harvest
   sent at the scripted pace (2 s), at the slow-rate pace (90 s), from a sybil of 10 accounts and a swarm of
   100 (no payment or network shared), hidden in a legitimate account's traffic (hydra) and among a
   student's questions on a person's clock (mimic); and the decomposition attacker. `--students` names the
   cache of trained students per attacker strategy.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from detectors.detector import EXCLUDED, TrafficDetector
from detectors.features import CHECKPOINTS, EXTRACTION, TIMING, WORDING
from detectors.monitor import Action, Monitor
from eval.attack import BENIGN_REPLAY, AttackConfig, evaluate, lab_parts
from eval.reference import load_teacher
from eval.reference.world import reference_task
from eval.report import write_study
from eval.student import StudentConfig
from eval.traffic import ATTACKERS, BENIGN, BENIGN_POPULATION, TrafficShape, simulate
from guard.defenses import DefenseParts

HELD_OUT = 1001  # the headline seed: never looked at while choosing features or thresholds
ATTACK_MIX = {**{kind: 10 for kind in ATTACKERS if kind not in ("sybil", "swarm", "spread")}, "sybil": 2, "swarm": 1,
              "spread": 2}


def share(hits: int, total: int) -> dict:
    low, high = binomtest(hits, total).proportion_ci() if total else (0.0, 1.0)
    return {"count": hits, "of": total, "share": hits / total if total else None, "ci95": [low, high]}


def simulated(seeds: list[int], mix: dict[str, int]) -> list[tuple[list, dict]]:
    return [simulate(mix, days=3, seed=seed) for seed in seeds]


def replay(detector: TrafficDetector, traffics: list[tuple[list, dict]], link: bool = True,
           campaigns: bool = True) -> dict:
    """Each seed's traffic through a fresh monitor; per kind: accounts blocked, judged, requests refused, named
    in a campaign."""
    per_kind = defaultdict(lambda: defaultdict(int, before_block=[]))
    for traffic, labels in traffics:
        monitor = Monitor(detector, link=link, campaign_every=10_000 if campaigns else 0)
        requests, served, degraded, blocked_at, via_link = defaultdict(int), defaultdict(int), defaultdict(int), {}, set()
        for event in traffic:
            client = event.client
            action = monitor.observe(event)
            requests[client] += 1
            served[client] += action.served
            degraded[client] += action.served and action.kind != "allow"
            if action.kind == "block" and client not in blocked_at:
                blocked_at[client] = requests[client]
                if "linked group" in action.reason:
                    via_link.add(client)
        for client, kind in labels.items():
            k = per_kind[kind]
            k["accounts"] += 1
            k["judged"] += requests[client] >= CHECKPOINTS[0] or client in blocked_at
            k["blocked"] += client in blocked_at
            k["campaign"] += "campaign" in monitor.actions.get(client, Action("allow")).reason
            k["via_link"] += client in via_link
            k["requests"] += requests[client]
            k["refused"] += requests[client] - served[client]
            k["degraded"] += degraded[client]
            k["served"] += served[client]
            if client in blocked_at:
                k["before_block"].append(blocked_at[client])
    out = {}
    for kind, k in sorted(per_kind.items()):
        out[kind] = {"accounts": k["accounts"], "blocked": share(k["blocked"], k["accounts"]),
                     "blocked_of_judged": share(k["blocked"], k["judged"]),
                     "via_link": k["via_link"] / k["accounts"],
                     "named_in_campaign": share(k["campaign"], k["accounts"]),
                     "median_requests_before_block": float(np.median(k["before_block"])) if k["before_block"] else None,
                     "served_per_account": k["served"] / k["accounts"],
                     "refused_share": k["refused"] / max(k["requests"], 1),
                     "degraded_share": k["degraded"] / max(k["requests"], 1)}
    return out


def ablation(benign, traffics: list[tuple[list, dict]]) -> dict:
    """Detection with each feature group, and each extraction feature, left out; and with the features left
    out by default put back. Each row: the worst benign kind's blocked share; per attacker the share
    blocked and the requests served per account before it was."""
    # the campaign test runs in one row only (it is slow): the other rows compare features
    settings = {"default": (EXCLUDED, False, False), "with the chain test": (EXCLUDED, True, False),
                "with the campaign test": (EXCLUDED, False, True)}
    for name, group in (("timing", TIMING[1:]), ("wording", WORDING), ("extraction", EXTRACTION)):
        settings[f"without {name}"] = (EXCLUDED + group, False, False)
    settings.update({f"without {f}": (EXCLUDED + (f,), False, False) for f in EXTRACTION if f not in EXCLUDED})
    settings.update({f"with {f}": (tuple(e for e in EXCLUDED if e != f), False, False) for f in EXCLUDED})
    rows = {}
    for name, (exclude, chain_test, campaigns) in settings.items():
        detector = TrafficDetector(use_embeddings=False, exclude=exclude, chain_test=chain_test).fit(benign)
        found = replay(detector, traffics, campaigns=campaigns)
        worst = max((k for k in BENIGN if k in found), key=lambda k: found[k]["blocked"]["share"])
        rows[name] = {"exclude": list(exclude), "chain_test": chain_test, "campaign_test": campaigns,
                      "worst benign": found[worst]["blocked"]["share"], "worst kind": worst,
                      "blocked": {k: found[k]["blocked"]["share"] for k in (*ATTACKERS, *BENIGN) if k in found},
                      "named_in_campaign": {k: found[k]["named_in_campaign"]["share"] for k in found},
                      "served_per_account": {k: found[k]["served_per_account"] for k in ATTACKERS if k in found}}
        print(name, json.dumps(rows[name]), flush=True)
    return rows


# The harvester's traffic shape through the monitor, per attacker kind of the simulator
SHAPES = {"naive": TrafficShape(), "slow": TrafficShape(pace=90), "sybil of 10": TrafficShape(accounts=10),
          "swarm of 100": TrafficShape(accounts=100), "hydra": TrafficShape(pace=60, cover=3),
          "mimic": TrafficShape(pace=60, cover=1, cover_kind="task", irregular=True)}


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


def percent(cell: dict) -> str:
    low, high = cell["ci95"]
    return f"{cell['share']:.1%} [{low:.1%}, {high:.1%}]" if cell["of"] else "—"


def named(kind: dict) -> str:
    """The share named in a campaign; a report from before the campaign test has none."""
    return percent(kind["named_in_campaign"]) if "named_in_campaign" in kind else "—"


def markdown(report: dict) -> str:
    variants = [v for v in VARIANTS if v in report]
    first = report[variants[0]]["detection"]
    lines = []
    if "held_out" in report:
        held = report["held_out"]["detection"]
        lines += [f"Headline, timing+content, held-out seed {report['held_out']['seed']}:", "",
                  "| traffic | accounts | blocked [95% CI] | blocked of judged [95% CI] | named in a campaign [95% CI] | "
                  "median requests before the block |",
                  "|---|---|---|---|---|---|"]
        for kind in [*ATTACKERS, *BENIGN]:
            if kind in held:
                median = held[kind]["median_requests_before_block"]
                lines.append(f"| {kind} | {held[kind]['accounts']} | {percent(held[kind]['blocked'])} | "
                             f"{percent(held[kind]['blocked_of_judged'])} | {named(held[kind])} | "
                             f"{'—' if median is None else f'{median:.0f}'} |")
        lines += ["", f"Seeds {', '.join(map(str, report['seeds']))}:", ""]
    campaigns = any("named_in_campaign" in k for k in first.values())  # a report from before the campaign test
    lines += ["| traffic | accounts | " + " | ".join(f"blocked, {v} [95% CI]" for v in variants) +
              " | blocked of judged | via a linked group | " + ("named in a campaign | " if campaigns else "") +
              "median requests before the block | served per account |",
              "|---|---|" + "---|" * (len(variants) + 4 + campaigns)]
    for kind in [*ATTACKERS, *BENIGN]:
        if kind not in first:
            continue
        k = first[kind]
        median = k["median_requests_before_block"]
        lines.append(f"| {kind} | {k['accounts']} | " + " | ".join(percent(report[v]['detection'][kind]['blocked'])
                                                                    for v in variants) +
                     f" | {percent(k['blocked_of_judged'])} | {k['via_link']:.0%} | " +
                     (f"{named(k)} | " if campaigns else "") +
                     f"{'—' if median is None else f'{median:.0f}'} | {k['served_per_account']:.0f} |")
    lines += ["", "| benign kind | refused share of its requests | served degraded |", "|---|---|---|"]
    for kind in BENIGN:
        if kind in first:
            lines.append(f"| {kind} | {first[kind]['refused_share']:.2%} | {first[kind]['degraded_share']:.2%} |")
    if "ablation" in report:
        kinds = [k for k in ATTACKERS if k in next(iter(report["ablation"].values()))["served_per_account"]]
        lines += ["", "| features | worst benign kind, blocked | " +
                  " | ".join(f"{k}: blocked, served per account" for k in kinds) + " |",
                  "|---|---|" + "---|" * len(kinds)]
        for name, row in report["ablation"].items():
            lines.append(f"| {name} | {row['worst kind']} {row['worst benign']:.1%} | " +
                         " | ".join(f"{row['blocked'][k]:.0%}, {row['served_per_account'][k]:.0f}" for k in kinds) + " |")
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
         progress: bool = True, replay_mix: dict[str, int] = BENIGN_REPLAY, students: str | None = None,
         ablate: bool = True, held_out: int | None = HELD_OUT) -> dict:
    start, out_dir = time.perf_counter(), Path(out)
    benign, _ = simulate(fit_mix, days=3, seed=0)
    test_mix = {**fit_mix, **ATTACK_MIX}
    report: dict = {"fit": fit_mix, "test": test_mix, "seeds": seeds, "benign_replay": replay_mix,
                    "target_fpr": 0.01}
    detectors, traffics = {}, simulated(seeds, test_mix)
    for name in variants:
        detector = detectors[name] = TrafficDetector(target_fpr=0.01, use_embeddings=VARIANTS[name]).fit(benign)
        report[name] = {"detection": replay(detector, traffics)}
        print(name, json.dumps(report[name], indent=1), flush=True)
    if held_out is not None:
        detector = detectors.get("timing+content") or TrafficDetector(use_embeddings=False).fit(benign)
        report["held_out"] = {"seed": held_out, "detection": replay(detector, simulated([held_out], test_mix))}
    if ablate:
        report["ablation"] = ablation(benign, traffics)
    if attack_seeds:
        # the monitor defence runs the timing+content detector, fitted on the study's benign traffic
        monitor_detector = detectors.get("timing+content") or TrafficDetector(use_embeddings=False).fit(benign)
        report["protection"] = protection(out_dir, budget, attack_seeds, progress, steps, eval_items, replay_mix,
                                          monitor_detector, students)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_study(out_dir, report, markdown(report))
    return report
