"""The provenance audit's validation: does it name teacher-a for students distilled from it, and only for them?

    distill-guard study provenance --out runs/provenance [--workers 2]

1. A zoo of students trained with the built-in trainer on the reference lab (`ZOO`):
   - positives, distilled from teacher-a: naive SFT at budgets 250-4,000, rationale, logit KD and LoRA
     students, the decomposition attacker and the paraphrasing attacker;
   - nulls: students of teacher-b, students of the world's own ground truth (no teacher at all), and
     students of teacher-a's answers only;
   - controls, which the audit compares against: teacher-b, one teacher-b student and one ground-truth
     student (none of them a null suspect).
2. Every suspect audited against teacher-a with those controls on the held-out questions (probes the
   attackers never asked); one cell per suspect under `cells/`, so a killed study resumes and the
   committed cells re-derive every number.
3. TPR at the measured FPR per test and combined, ROC curves, the smallest budget each test detects at
   α = 1e-3, the probes each test costs, and the nulls' p-values against uniform (KS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import kstest
from sklearn.metrics import auc, roc_curve
from tqdm import tqdm

from detectors.provenance import ProvenanceTest, sign_test
from eval.attack import AttackConfig, run_attack
from eval.metrics import Accuracy
from eval.reference import GroundTruth, load_teacher
from eval.reference.world import reference_task
from eval.report import write_study
from eval.student import StudentConfig
import guard.audit as audit
from guard.hf_teacher import HFTeacher
from guard.teacher import Teacher


@dataclass(frozen=True)
class Suspect:
    """One student of the zoo: who taught it, how, and what the audit should say about it."""

    role: str  # "positive", "null" or "control"
    source: str  # "teacher-a", "teacher-b" or "ground-truth"
    strategy: str = "naive"
    mode: str = "sft"
    budget: int = 1000
    seed: int = 0
    lora_on: str | None = None  # LoRA on this zoo student's weights (the attacker's own pretrained model)

    @property
    def name(self) -> str:
        kind = f"lora-{self.mode}" if self.lora_on else self.mode
        return f"{self.source}-{self.strategy}-{kind}-b{self.budget}-s{self.seed}"

    @property
    def with_reasoning(self) -> bool:
        """Trained on the teacher's own reasoning as served (what the TPR target is about)."""
        return self.strategy == "naive" and self.mode != "answer"


def _zoo() -> list[Suspect]:
    a = [Suspect("positive", "teacher-a", budget=b, seed=s)
         for b, seeds in ((250, 2), (500, 2), (1000, 3), (2000, 2), (4000, 1)) for s in range(seeds)]
    a += [Suspect("positive", "teacher-a", strategy=st, mode=m, budget=b)
          for st, m in (("naive", "rationale"), ("naive", "kd"), ("decompose", "sft"), ("paraphrase", "sft"))
          for b in (1000, 2000)]
    base = Suspect("null", "ground-truth", budget=2000, seed=1)
    a += [Suspect("positive", "teacher-a", budget=b, lora_on=base.name) for b in (1000, 2000)]
    b = [Suspect("null", "teacher-b", budget=bb, seed=s)
         for bb, seeds in ((250, 3), (500, 2), (1000, 2), (2000, 1)) for s in range(seeds)]
    b += [Suspect("null", "teacher-b", mode=m) for m in ("rationale", "kd")]
    truth = [Suspect("null", "ground-truth", budget=bb, seed=s)
             for bb, seeds in ((250, 1), (500, 2), (1000, 2)) for s in range(seeds)] + [base]
    answers = [Suspect("null", "teacher-a", mode="answer", budget=bb) for bb in (250, 500, 1000, 2000)]
    controls = [Suspect("control", "teacher-b", budget=2000, seed=7), Suspect("control", "ground-truth", budget=2000, seed=7)]
    # training order: controls, then the acceptance pair, then everything else, LoRA (which needs its base) last
    first = [Suspect("positive", "teacher-a"), Suspect("null", "teacher-b")]
    rest = [s for s in a + b + truth + answers if s not in first]
    return controls + first + sorted(rest, key=lambda s: s.lora_on is not None)


ZOO = _zoo()
TEACHER, TEACHER_B = "reference", "reference:teacher-b"


def teacher_for(source: str):
    return GroundTruth() if source == "ground-truth" else load_teacher(TEACHER if source == "teacher-a" else TEACHER_B)


def student_dir(out: Path, suspect: Suspect) -> Path:
    return out / "students" / suspect.name


def base_dir(out: Path, suspect: Suspect) -> Path | None:
    """Where the zoo student a LoRA suspect starts from is trained; None for a suspect trained from scratch."""
    return suspect.lora_on and student_dir(out, next(s for s in ZOO if s.name == suspect.lora_on))


def train(suspect: Suspect, out: Path, progress: bool = False) -> Path:
    """The suspect's checkpoint, trained once (a finished one is kept; a killed one starts over)."""
    where = student_dir(out, suspect)
    if (where / "student" / "model.safetensors").exists():
        return where / "student"
    config = StudentConfig(mode=suspect.mode)
    if suspect.lora_on:
        base = base_dir(out, suspect) / "student"
        if not (base / "model.safetensors").exists():
            raise FileNotFoundError(f"{suspect.name} starts from {suspect.lora_on}, not trained yet")
        config = replace(config, init=str(base), lora=True)
    start = time.perf_counter()
    result = run_attack(teacher_for(suspect.source), reference_task(), AttackConfig(strategy=suspect.strategy,
                        budget=suspect.budget, student=config), suspect.seed, where, progress=progress,
                        save_student=True)
    (where / "trained.json").write_text(json.dumps({
        "suspect": suspect.name, "accuracy": float(result["after"].mean()), "queries": result["queries"],
        "training_rows": result["training_rows"], "train_seconds": round(time.perf_counter() - start, 1)}) + "\n")
    return where / "student"


def train_zoo(out: Path, worker: int = 0, workers: int = 1) -> None:
    """Train the zoo's students; several workers (each its own process) split it by claiming students."""
    for suspect in ZOO:
        where = student_dir(out, suspect)
        if (where / "trained.json").exists():
            continue
        where.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(where / ".claimed")
        except FileExistsError:
            if workers > 1:
                continue  # another worker has it (a claim left by a killed run: remove students/*/.claimed)
        base = base_dir(out, suspect)
        while base and not (base / "trained.json").exists():
            time.sleep(30)  # the other worker is still training the base
        started = time.perf_counter()
        train(suspect, out)
        print(f"[worker {worker}] {suspect.name}: {time.perf_counter() - started:.0f} s", flush=True)


# The audit every suspect meets: teacher-a, three controls that never learned from it, the held-out questions.
CONTROLS = {"teacher-b": TEACHER_B, **{s.name: s for s in ZOO if s.role == "control"}}
ALPHA = 1e-3
PROBE_COUNTS = (10, 25, 50, 100, 200, 400, 600)


def control_models(out: Path) -> dict[str, Teacher]:
    return {name: load_teacher(spec) if isinstance(spec, str) else HFTeacher(student_dir(out, spec) / "student")
            for name, spec in CONTROLS.items()}


class Audit:
    """The teacher's and the controls' answers and likelihood rows, computed once for every suspect."""

    def __init__(self, out: Path, prompts: list[str]):
        self.prompts = prompts
        self.controls = control_models(out)
        self.teacher = audit.answer(load_teacher(TEACHER), prompts)
        self.answers = {name: audit.answer(model, prompts) for name, model in self.controls.items()}
        self.writers = {"teacher": self.teacher.texts, **{n: a.texts for n, a in self.answers.items()}}
        self.rows = audit.logprob_table({n: audit.weights(m) for n, m in self.controls.items()}, self.writers, prompts)

    def __call__(self, suspect_dir: Path) -> tuple[audit.Answers, dict[str, ProvenanceTest]]:
        model = HFTeacher(suspect_dir)
        answers = audit.answer(model, self.prompts)
        rows = {**self.rows, **audit.logprob_table({"suspect": audit.weights(model)}, self.writers, self.prompts)}
        return answers, audit.provenance_tests(self.prompts, answers.texts, self.teacher.texts,
                                               {n: a.texts for n, a in self.answers.items()}, rows)


def p_at(test: ProvenanceTest, probes: int) -> float:
    """The test's p-value on the first `probes` probes only (the idiosyncrasy classifier was still fitted on
    folds of all of them)."""
    return max(sign_test(np.array(lead[:probes]))["p_value"] for lead in test.lead.values())


def audit_cell(out: Path, suspect: Suspect, auditor: Audit) -> dict:
    """One suspect's audit, stored in cells/ (resumed from there)."""
    path = out / "cells" / f"{suspect.name}.json"
    if path.exists():
        return json.loads(path.read_text())
    trained = json.loads((student_dir(out, suspect) / "trained.json").read_text())
    answers, tests = auditor(student_dir(out, suspect) / "student")
    evidence = audit.Evidence(tests)
    cell = {"suspect": suspect.name, **asdict(suspect), "with_reasoning": suspect.with_reasoning,
            "accuracy": trained["accuracy"], "training_rows": trained["training_rows"], "train_seconds": trained["train_seconds"],
            "probes": len(auditor.prompts), "suspect_tokens": answers.tokens,
            "verdict": audit.verdict(evidence, ALPHA),
            "tests": {name: t.to_dict() for name, t in tests.items()},
            "p_by_probes": {name: {str(n): p_at(t, n) for n in PROBE_COUNTS if n <= len(auditor.prompts)}
                            for name, t in tests.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell, indent=1) + "\n")
    return cell


def combined_p(cell: dict, probes: int | None = None) -> float:
    """The verdict's Bonferroni merge, on all probes or on the first `probes`."""
    if probes is None:
        return cell["verdict"]["bonferroni"]
    values = [by[str(probes)] for by in cell["p_by_probes"].values()]
    return min(1.0, len(values) * min(values))


def p_of(cell: dict, test: str, probes: int | None = None) -> float:
    if test == "combined":
        return combined_p(cell, probes)
    if probes is None:
        return cell["verdict"]["p_values"][test]
    return cell["p_by_probes"][test][str(probes)]


def in_target(cell: dict) -> bool:
    """The TPR target's population: distilled from teacher-a with its reasoning, from 1,000 queries up."""
    return cell["role"] == "positive" and cell["with_reasoning"] and cell["budget"] >= 1000


def rate(flags: list[bool]) -> dict:
    accuracy = Accuracy(np.array(flags, dtype=bool))
    return {"rate": accuracy.value, "count": int(sum(flags)), "of": len(flags), "ci95": list(accuracy.clopper_pearson())}


def summarize(cells: list[dict]) -> dict:
    positives = [c for c in cells if c["role"] == "positive"]
    nulls = [c for c in cells if c["role"] == "null"]
    groups = {"target (teacher-a, with reasoning, >= 1,000 queries)": [c for c in positives if in_target(c)],
              "all positives": positives, "paraphrasing attacker": [c for c in positives if c["strategy"] == "paraphrase"],
              "decomposition attacker": [c for c in positives if c["strategy"] == "decompose"],
              "nulls: teacher-b students": [c for c in nulls if c["source"] == "teacher-b"],
              "nulls: ground-truth students": [c for c in nulls if c["source"] == "ground-truth"],
              "nulls: teacher-a answers only": [c for c in nulls if c["source"] == "teacher-a"], "all nulls": nulls}
    tests = {}
    for test in [*audit.TESTS, "combined"]:
        def ran(c: dict) -> bool:
            return test == "combined" or test in c["verdict"]["p_values"]

        scored = [c for c in cells if c["role"] != "control" and ran(c)]
        labels = [c["role"] == "positive" for c in scored]
        scores = [-np.log10(max(p_of(c, test), 1e-300)) for c in scored]
        fpr, tpr, _ = roc_curve(labels, scores) if len(set(labels)) == 2 else ([], [], [])
        naive = [c for c in positives if c["strategy"] == "naive" and c["mode"] == "sft" and not c["lora_on"]]
        caught = [b for b in sorted({c["budget"] for c in naive})
                  if all(p_of(c, test) < ALPHA for c in naive if c["budget"] == b)]
        needed = [next((n for n in PROBE_COUNTS if n <= c["probes"] and p_of(c, test, n) < ALPHA), None)
                  for c in groups["target (teacher-a, with reasoning, >= 1,000 queries)"]]
        null_p = [p_of(c, test) for c in nulls if ran(c)]
        ks = kstest(null_p, "uniform", alternative="greater") if null_p else None
        tests[test] = {
            "named_at_alpha": {g: rate([p_of(c, test) < ALPHA for c in members if ran(c)])
                               for g, members in groups.items()},
            "auc": float(auc(fpr, tpr)) if len(fpr) else None, "roc": {"fpr": list(map(float, fpr)), "tpr": list(map(float, tpr))},
            "smallest_budget_caught": caught[0] if caught else None,
            "probes_needed_median": float(np.median([n for n in needed if n])) if any(needed) else None,
            "probes_needed_max": max((n for n in needed if n), default=None),
            "target_not_caught_by_600_probes": sum(n is None for n in needed),
            "nulls_ks_uniform": {"p_value": float(ks.pvalue), "statistic": float(ks.statistic),
                                 "nulls": len(null_p)} if ks else None}
    return {"alpha": ALPHA, "controls": list(CONTROLS), "tests": tests,
            "groups": {g: [c["suspect"] for c in members] for g, members in groups.items()}}


def plot_roc(summary: dict, path: Path) -> None:
    fig = Figure(figsize=(5.5, 4.5))  # no pyplot: no global backend, no figure left open
    ax = fig.subplots()
    for test, s in summary["tests"].items():
        if s["auc"] is not None:
            ax.step(s["roc"]["fpr"], s["roc"]["tpr"], where="post", label=f"{test} (AUC {s['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false-positive rate (nulls)")
    ax.set_ylabel("true-positive rate (students of teacher-a)")
    ax.set_title("Provenance tests: students of teacher-a against nulls")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(report: dict) -> str:
    s = report["summary"]
    tests = list(s["tests"])
    lines = [f"Named at α = {s['alpha']:g} (combined: Bonferroni over the tests), of the group's suspects; controls: "
             + ", ".join(f"`{c}`" for c in s["controls"]) + ".", "",
             "| group | " + " | ".join(tests) + " |", "|---|" + "---|" * len(tests)]
    for group in s["groups"]:
        rates = [s["tests"][t]["named_at_alpha"][group] for t in tests]
        lines.append(f"| {group} | " + " | ".join(f"{r['count']}/{r['of']}" if r["of"] else "—" for r in rates) + " |")
    lines += ["", "| test | AUC | smallest naive-SFT budget caught (every seed) | probes needed for the target group "
                  "(median, max) | nulls' p-values vs uniform (one-sided KS p) |", "|---|---|---|---|---|"]
    for test, t in s["tests"].items():
        ks = t["nulls_ks_uniform"]
        missed = t["target_not_caught_by_600_probes"]
        lines.append(f"| {test} | {t['auc']:.3f} | {t['smallest_budget_caught']} | {t['probes_needed_median']:g}, "
                     f"{t['probes_needed_max']}" + (f" ({missed} not by {report['meta']['probes']})" if missed else "")
                     + " | " + (f"{ks['p_value']:.2f} ({ks['nulls']} nulls)" if ks else "—") + " |")
    lines += ["", "| suspect | role | accuracy | " + " | ".join(audit.TESTS) + " | combined | named |",
              "|---|---|---|" + "---|" * (len(audit.TESTS) + 2)]
    for c in report["cells"]:
        ps = [f"{c['verdict']['p_values'][t]:.2g}" if t in c["verdict"]["p_values"] else "—" for t in audit.TESTS]
        lines.append(f"| {c['suspect']} | {c['role']} | {c['accuracy']:.2f} | " + " | ".join(ps)
                     + f" | {c['verdict']['bonferroni']:.2g} | {'yes' if c['verdict']['distilled'] else 'no'} |")
    return "\n".join(lines)


def main(out: str | Path, workers: int = 1, probes: int = 600) -> dict:
    """Train the zoo (resumable; `workers` processes of one thread each), audit every suspect, write the report."""
    out = Path(out)
    start = time.perf_counter()
    if workers > 1:
        procs = [subprocess.Popen([sys.executable, "-c", f"from eval.provenance_study import train_zoo; from pathlib "
                                   f"import Path; train_zoo(Path({str(out)!r}), {w}, {workers})"],
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for w in range(workers)]
        if any(p.wait() for p in procs):
            raise RuntimeError("a training worker failed; its log is above")
    train_zoo(out)  # the rest, and anything a worker left behind
    auditor = Audit(out, [i.prompt for i in reference_task().eval_items[:probes]])
    cells = [audit_cell(out, s, auditor) for s in tqdm(ZOO, desc="audits") if s.role != "control"]
    report = {"meta": {"teacher": TEACHER, "controls": {n: s if isinstance(s, str) else s.name
                                                        for n, s in CONTROLS.items()},
                       "probes": probes, "suspects": len(cells), "wall_seconds": round(time.perf_counter() - start, 1)},
              "summary": summarize(cells), "cells": cells}
    plot_roc(report["summary"], out / "roc.png")
    write_study(out, report, markdown(report))
    return report
