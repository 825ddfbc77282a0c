"""The defences validated through the gateway, over real HTTP: the attack takes the code path a real client takes.

    distill-guard study gateway --out eval/results/gateway [--seeds 3] [--budget 2000]
        [--students eval/results/redaction-naive/students]

Three gateways over teacher-a on loopback, each with its SQLite store (keys and audit log) in the out
directory: `--defense none`, `--defense answer-only`, and `--defense monitor --lab` (the lab's detector, and
its clock: each request's simulated time travels in the `LAB_TIME_HEADER`). Every account, attacker or
benign, sends with an API key of its own, through `OpenAITeacher` and the real `openai` SDK.

1. Greedy capability through each gateway, compared text by text with the same defence in-process.
2. `evaluate` of the naive attacker through each gateway at budget B over S seeds; through the monitor in the
   traffic study's naive (2 s pace), slow (90 s) and hydra (60 s, 3 cover requests per attack request) shapes.
   Protection = 1 - tau_D / tau_none, both through the gateway, bootstrapped over items and seeds.
3. Benign cost: one day of the lab's benign users (seed 101, unseen by the detector) replayed through the
   monitor gateway, carrying the held-out items; accuracy paired item by item with the undefended gateway's.

Each number is set beside the lab's in-process one (eval/results/redaction-naive, eval/results/traffic):
identical harvest rows through HTTP and in-process mean the gateway is the same code path, and then the
student trained on them before is reused from the `students` cache rather than trained again.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from detectors.detector import TrafficDetector
from eval.attack import BENIGN_REPLAY, AttackConfig, evaluate, lab_parts
from eval.metrics import Accuracy, capability
from eval.reference import load_teacher
from eval.reference.world import reference_task
from eval.report import Outcome, bootstrap_tau, paired_difference, write_study
from eval.student import StudentConfig
from eval.traffic import TrafficShape, served_to_benign_users, simulate
from eval.traffic_study import SHAPES
from guard.defenses import DefenseParts, build_defense, split_outer_policy
from guard.gateway.app import create_app, serve_in_thread
from guard.gateway.store import SQLiteStore, Store
from guard.openai_teacher import OpenAITeacher, TeacherRequestError
from guard.teacher import Caller, Completion, Sampling, Teacher, callers_for

MODEL = "teacher-a"
# defence -> (lab clock, the attackers sent through it: traffic shapes of the traffic study)
GATEWAYS = {"none": (False, ("naive",)), "answer-only": (False, ("naive",)),
            "monitor": (True, ("naive", "slow", "hydra"))}
# The lab's in-process evaluations of the same attacks: (directory, defence name there)
LAB = {("none", "naive"): ("eval/results/redaction-naive", "none"),
       ("answer-only", "naive"): ("eval/results/redaction-naive", "answer-only"),
       **{("monitor", shape): (f"eval/results/traffic/protection-naive/{shape}", "monitor")
          for shape in ("naive", "slow", "hydra")}}


class LabClient(OpenAITeacher):
    """An account's client. A prompt the gateway turns away for its length (a 400) comes back empty with
    finish_reason "context_length", as the local teacher answers it in-process, so that one over-long benign
    prompt does not end a replay of thousands."""

    def _complete_one(self, prompt: str, sampling: Sampling, caller: Caller | None = None) -> Completion:
        try:
            return super()._complete_one(prompt, sampling, caller)
        except TeacherRequestError as error:
            if error.code != "context_length_exceeded":
                raise
            return Completion(text="", finish_reason="context_length")


class GatewayAccounts(Teacher):
    """The experiment's side of a gateway: each caller's account sends with an API key of its own, created in
    the gateway's store on first use, through `OpenAITeacher` (with `lab_clock`, its simulated time in the
    lab-time header, in order). `fresh()` is the next replicate: accounts the gateway has never seen, as a
    fresh deployment is in-process. `remembers_callers` says what the experimenter knows of the gateway."""

    def __init__(self, url: str, store: Store, lab_clock: bool = False, remembers_callers: bool = False):
        self.url, self.store, self.lab_clock, self.remembers_callers = url, store, lab_clock, remembers_callers
        self.name, self.clients = MODEL, {}
        self.replicate = next(self._replicates)

    _replicates = itertools.count()  # every account name stays new to the gateway within one process

    def fresh(self) -> GatewayAccounts:
        clone = copy.copy(self)
        clone.replicate, clone.clients = next(self._replicates), {}
        return clone

    def account(self, caller_account: str) -> str:
        return f"{caller_account}@{self.replicate}"

    def client(self, caller_account: str) -> OpenAITeacher:
        if caller_account not in self.clients:
            key = self.store.create_key(self.account(caller_account))
            self.clients[caller_account] = LabClient(f"{self.url}/v1", MODEL, api_key=key, api="completions",
                                                     lab_clock=self.lab_clock)
        return self.clients[caller_account]

    def complete(self, prompts: list[str], sampling: Sampling = Sampling(),
                 callers: Sequence[Caller] | None = None) -> list[Completion]:
        """Each run of one account's consecutive prompts goes out through its key, runs in order."""
        callers = callers_for(prompts, callers)
        out: list[Completion] = []
        for account, run in itertools.groupby(range(len(prompts)), key=lambda i: callers[i].account):
            run = list(run)
            out += self.client(account).complete([prompts[i] for i in run], sampling, [callers[i] for i in run])
        return out


def gateway_app(teacher: Teacher, defense: str, parts: DefenseParts, store: Store, lab_clock: bool):
    """The app `distill-guard gateway --defense DEFENSE --store ... [--lab]` serves."""
    inner, policy = split_outer_policy(defense, parts)
    return create_app(lambda: build_defense(inner, teacher, parts), MODEL, sealer=parts.sealer, policy=policy,
                      store=store, lab_clock=lab_clock)


def same_texts(a: list[Completion], b: list[Completion]) -> int:
    return sum(x.text == y.text for x, y in zip(a, b))


def refused_share(store: Store, accounts: list[str]) -> dict:
    """The share of these accounts' requests the gateway refused (403), from its audit log; and how many it
    turned away for their length (400: over the model's context, refused with or without a defence)."""
    mine = set(accounts)
    statuses = [r.status for r in store.records() if r.account in mine]
    total, refused = len(statuses), statuses.count(403)
    return {"requests": total, "refused": refused, "refused_share": refused / total if total else None,
            "over_context": statuses.count(400)}


def lab_cell(root: Path, defense: str, budget: int, seed: int) -> dict | None:
    path = root / "runs" / f"{defense.replace(':', '-')}-naive-sft-b{budget}-s{seed}" / "cell.json"
    return json.loads(path.read_text()) if path.exists() else None


def lab_row(root: Path, defense: str, budget: int) -> dict | None:
    path = root / "report.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    return next((r for r in rows if r["defense"] == defense and r["budget"] == budget), None)


def attack_cells(client: GatewayAccounts, task, shape: TrafficShape, budget: int, seeds: int, out: Path,
                 students: Path, steps: int | None, progress: bool, served: tuple[Accuracy, list]) -> list[dict]:
    """`evaluate` through the gateway (its own report beside the cells), given the teacher as served there."""
    attack = AttackConfig(strategy="naive", student=StudentConfig(mode="sft", steps=steps), traffic=shape)
    evaluate(client, task, ["none"], attack, [budget], seeds, out, progress=progress, students=students,
             served_as={"none": served})
    return [json.loads((out / "runs" / f"none-naive-sft-b{budget}-s{s}" / "cell.json").read_text())
            for s in range(seeds)]


def outcome(served: Accuracy, cells: list[dict]) -> Outcome:
    seeds = len(cells)
    return Outcome(np.repeat(served.per_item[:, None], seeds, axis=1).astype(float),
                   np.stack([np.array(c["before"]) for c in cells], 1).astype(float),
                   np.stack([np.array(c["after"]) for c in cells], 1).astype(float))


def main(out: str, seeds: int = 3, budget: int = 2000, students: str | None = None, steps: int | None = None,
         eval_items: int | None = None, replay_mix: dict[str, int] = BENIGN_REPLAY,
         detector: TrafficDetector | None = None, lab_root: str = ".", progress: bool = True) -> dict:
    start, out_dir = time.perf_counter(), Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(students) if students else out_dir / "students"
    teacher, task = load_teacher("reference"), reference_task()
    task.eval_items = task.eval_items[:eval_items]
    benign, _ = simulate(replay_mix, days=1, seed=101)
    parts = lab_parts(["monitor"]) if detector is None else DefenseParts(detector=detector)
    report: dict = {"meta": {"teacher": MODEL, "task": task.name, "eval_items": len(task.eval_items),
                             "budget": budget, "seeds": seeds, "benign_replay": replay_mix, "students": str(cache)},
                    "served": {}, "attacks": []}
    served_accuracy, cells_of = {}, {}
    for defense, (lab_clock, attackers) in GATEWAYS.items():
        store_path = out_dir / f"gateway-{defense}.sqlite"
        for stale in (store_path, *(store_path.with_name(store_path.name + x) for x in ("-wal", "-shm"))):
            stale.unlink(missing_ok=True)  # a rerun's gateway starts with no memory; its audit log, too
        with SQLiteStore(store_path) as store, serve_in_thread(gateway_app(teacher, defense, parts, store, lab_clock)) as url:
            # the teacher as its benign users are served: through the monitor, amid their replayed traffic
            users = GatewayAccounts(url, store, lab_clock, remembers_callers=lab_clock)
            in_process = build_defense(defense, teacher, parts).fresh()
            if lab_clock:
                (accuracy, texts), (lab_accuracy, lab_texts) = (served_to_benign_users(t, task, benign)
                                                                for t in (users, in_process))
            else:
                (accuracy, texts), (lab_accuracy, lab_texts) = (capability(t, task) for t in (users, in_process))
            served_accuracy[defense] = accuracy
            report["served"][defense] = {
                "accuracy": accuracy.value, "accuracy_ci95": list(accuracy.clopper_pearson()),
                "in_process_accuracy": lab_accuracy.value, "items": accuracy.total,
                "texts_identical_in_process": same_texts(texts, lab_texts),
                "items_refused": sum(c.finish_reason == "refused" for c in texts),
                "over_context": {"gateway": sum(c.finish_reason == "context_length" for c in texts),
                                 "in_process": sum(c.finish_reason == "context_length" for c in lab_texts)},
                **({"benign_requests": refused_share(store, [users.account(a) for a in users.clients])}
                   if lab_clock else {})}
            print(defense, json.dumps(report["served"][defense]), flush=True)
            for attacker in attackers:
                shape = replace(SHAPES[attacker] if lab_clock else TrafficShape(), account=attacker)
                cells_of[defense, attacker] = attack_cells(GatewayAccounts(url, store, lab_clock), task, shape,
                                                           budget, seeds, out_dir / f"{defense}-{attacker}", cache,
                                                           steps, progress, (accuracy, texts))
    report["benign_cost"] = {"accuracy_drop": paired_difference(served_accuracy["none"].per_item,
                                                                served_accuracy["monitor"].per_item),
                             **report["served"]["monitor"]["benign_requests"]}
    outcomes = {key: outcome(served_accuracy[key[0]], cells) for key, cells in cells_of.items()}
    for (defense, attacker), cells in cells_of.items():
        stats = bootstrap_tau(outcomes[defense, attacker],
                              outcomes["none", "naive"] if defense != "none" else None)
        root, lab_defense = LAB[defense, attacker]
        lab = [lab_cell(Path(lab_root) / root, lab_defense, budget, s) for s in range(seeds)]
        reference = lab_row(Path(lab_root) / root, lab_defense, budget)
        report["attacks"].append({
            "defense": defense, "attacker": attacker, "seeds": seeds, "budget": budget,
            "teacher_acc": served_accuracy[defense].value,
            "student_before_acc": float(outcomes[defense, attacker].before.mean()),
            "student_after_acc": float(outcomes[defense, attacker].after.mean()),
            "queries": int(np.mean([c["queries"] for c in cells])),
            "training_rows": [c["training_rows"] for c in cells], **stats,
            "students_reused": sum(bool(c.get("reused")) for c in cells),
            "same_rows_as_in_process": [bool(m) and m.get("training_key") == c["training_key"]
                                        for c, m in zip(cells, lab)],
            "in_process": None if reference is None else {
                "defense": lab_defense, "seeds": reference["seeds"], "transfer": reference["transfer"],
                "protection": reference.get("protection"), "training_rows": [m and m["training_rows"] for m in lab]}})
    report["meta"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_study(out_dir, report, markdown(report))
    return report


def _ci(stat: dict | None) -> str:
    if not stat:
        return "—"
    return f"{stat['mean']:.2f} [{stat['ci95'][0]:.2f}, {stat['ci95'][1]:.2f}]"


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"Through the gateway over HTTP: teacher {meta['teacher']}, budget {meta['budget']}, {meta['seeds']} "
             f"seed(s), {meta['eval_items']} held-out items. In-process: the lab's committed evaluation of the same "
             "attack.", "",
             "| defence | attacker | rows kept | transfer τ [95% CI] | protection [95% CI] | in-process τ | "
             "in-process protection | same rows as in-process | students reused |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["attacks"]:
        lab = r["in_process"] or {}
        same = sum(r["same_rows_as_in_process"])
        lines.append(f"| {r['defense']} | {r['attacker']} | {'/'.join(map(str, r['training_rows']))} | "
                     f"{_ci(r['transfer'])} | {_ci(r.get('protection'))} | {_ci(lab.get('transfer'))} | "
                     f"{_ci(lab.get('protection'))} | {same}/{r['seeds']} | {r['students_reused']}/{r['seeds']} |")
    lines += ["", "| gateway | teacher acc as served | in-process | greedy texts identical to in-process | "
                  "held-out items refused |", "|---|---|---|---|---|"]
    for defense, s in report["served"].items():
        lines.append(f"| {defense} | {s['accuracy']:.3f} | {s['in_process_accuracy']:.3f} | "
                     f"{s['texts_identical_in_process']}/{s['items']} | {s['items_refused']} |")
    cost = report["benign_cost"]
    drop = cost["accuracy_drop"]
    lines += ["", f"Benign cost of the monitor (replayed benign users, each with its own key): accuracy drop "
                  f"{drop['mean']:+.3f} [{drop['ci95'][0]:+.3f}, {drop['ci95'][1]:+.3f}] against the undefended "
                  f"gateway ({drop['items_changed']} items changed); {cost['refused']} of {cost['requests']} benign "
                  f"requests refused ({(cost['refused_share'] or 0):.2%}); {cost.get('over_context', 0)} turned "
                  "away for a prompt over the teacher's context (with or without a defence)."]
    return "\n".join(lines)
