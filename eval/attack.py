"""The distillation attack and the evaluation that measures it: harvest, student, transfer.

    Task -> Teacher (defended) -> Harvest -> Student -> Report

`evaluate` runs every (defence, budget, seed) cell, scores the teacher as served and each student
before and after distillation on the same held-out items, and reports transfer and protection with
bootstrap intervals.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from eval.harvest import Budget, Harvester, completion_row
from eval.metrics import capability
from eval.report import Outcome, bootstrap_tau, write_report
from eval.strategies import DEFAULT_TEMPERATURE, STRATEGIES
from eval.student import StudentConfig, init_student, train_student
from eval.task import Task
from guard.teacher import HFTeacher, Sampling, Teacher


def apply_defense(name: str, teacher: Teacher) -> Teacher:
    """The teacher as served under defence `name`."""
    if name == "none":
        return teacher
    raise ValueError(f"unknown defence {name!r}; available: none")


@dataclass
class AttackConfig:
    strategy: str = "naive"
    budget: int = 2000
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, max_new_tokens=64))
    temperature: float | None = None  # overrides sampling.temperature; None: the strategy's default
    student: StudentConfig = field(default_factory=StudentConfig)


def correctness(teacher: Teacher, task: Task) -> np.ndarray:
    return capability(teacher, task)[0].per_item


def run_attack(teacher: Teacher, task: Task, config: AttackConfig, seed: int, out_dir: Path,
               defense: str = "none", progress: bool = True) -> dict:
    """One harvest and one student; returns per-item correctness of the student before and after."""
    if config.strategy not in STRATEGIES:
        raise ValueError(f"unknown attacker strategy {config.strategy!r}; choose one of {sorted(STRATEGIES)}")
    temperature = DEFAULT_TEMPERATURE[config.strategy] if config.temperature is None else config.temperature
    sampling = replace(config.sampling, seed=seed * 1_000_003, temperature=temperature)
    if config.student.mode == "kd" and not sampling.logprobs:
        sampling = replace(sampling, logprobs=20)
    harvester = Harvester(teacher, out_dir / "harvest", Budget(config.budget), sampling,
                          manifest={"teacher": teacher.name, "defense": defense, "task": task.name,
                                    "strategy": config.strategy, "seed": seed}, progress=progress)
    pairs = STRATEGIES[config.strategy](task, seed)(harvester)
    harvest = harvester.close()
    rows = [completion_row(i, prompt, completion) for i, (prompt, completion) in enumerate(pairs)]

    student_config = replace(config.student, seed=seed)
    before_model, before_tok = init_student(student_config)
    before = correctness(HFTeacher("student-before", model=before_model, tokenizer=before_tok), task)
    start = time.perf_counter()
    model, tokenizer, result = train_student(rows, student_config, output_dir=str(out_dir / "trainer"),
                                             progress=progress)
    after = correctness(HFTeacher("student-after", model=model, tokenizer=tokenizer), task)
    return {"before": before, "after": after, "queries": len(harvest), "train_seconds": time.perf_counter() - start,
            "tokens_per_s": result.tokens_per_s, "final_loss": result.losses[-1][1] if result.losses else None,
            "first_loss": result.losses[0][1] if result.losses else None, "training_rows": len(rows)}


def run_cell(teacher: Teacher, task: Task, config: AttackConfig, seed: int, cell_dir: Path, defense: str,
             progress: bool) -> dict:
    """One finished attack, from cell.json when an earlier (perhaps killed) evaluation already ran it."""
    settings = {"config": asdict(config), "seed": seed, "defense": defense, "teacher": teacher.name,
                "eval_prompts": [i.prompt for i in task.eval_items]}
    saved = cell_dir / "cell.json"
    if saved.exists():
        cell = json.loads(saved.read_text())
        if cell.get("settings") == json.loads(json.dumps(settings)):
            return {**cell, "before": np.array(cell["before"]), "after": np.array(cell["after"])}
    cell = run_attack(teacher, task, config, seed, cell_dir, defense, progress)
    saved.write_text(json.dumps({**{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in cell.items()},
                                 "settings": settings}) + "\n")
    return cell


def evaluate(teacher: Teacher, task: Task, defenses: list[str], attack: AttackConfig, budgets: list[int],
             seeds: int, out_dir: str | Path, progress: bool = True) -> dict:
    """Every defence x budget x seed; writes report.json, report.md and plots to `out_dir`."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    served_correct = {}
    for defense in defenses:
        served_correct[defense] = correctness(apply_defense(defense, teacher), task)
    baseline = served_correct.get("none")
    outcomes, rows = {}, []
    for defense in defenses:
        served = apply_defense(defense, teacher)
        for budget in budgets:
            cells = []
            for seed in range(seeds):
                cell_dir = out_dir / "runs" / f"{defense}-{attack.strategy}-{attack.student.mode}-b{budget}-s{seed}"
                cells.append(run_cell(served, task, replace(attack, budget=budget), seed, cell_dir, defense, progress))
            teacher_matrix = np.repeat(served_correct[defense][:, None], seeds, axis=1).astype(float)
            outcome = Outcome(teacher_matrix, np.stack([c["before"] for c in cells], 1).astype(float),
                              np.stack([c["after"] for c in cells], 1).astype(float))
            outcomes[defense, budget] = outcome
            reference = outcomes.get(("none", budget)) if defense != "none" else None
            stats = bootstrap_tau(outcome, reference)
            teacher_acc = float(served_correct[defense].mean())
            rows.append({
                "defense": defense, "attack": f"{attack.strategy}/{attack.student.mode}", "budget": budget,
                "seeds": seeds, "teacher_acc": teacher_acc, "student_before_acc": float(outcome.before.mean()),
                "student_after_acc": float(outcome.after.mean()), "transfer": stats["transfer"],
                "protection": stats.get("protection"),
                "utility_cost": {"accuracy_drop": float(baseline.mean() - teacher_acc) if baseline is not None else 0.0},
                "queries": int(np.mean([c["queries"] for c in cells])),
                "train_seconds": float(np.mean([c["train_seconds"] for c in cells])),
                "student_tokens_per_s": float(np.mean([c["tokens_per_s"] for c in cells])),
            })
    meta = {"teacher": teacher.name, "task": task.name, "eval_items": len(task.eval_items),
            "attack": {**asdict(attack)}, "budgets": budgets, "seeds": seeds,
            "wall_seconds": round(time.perf_counter() - start, 1)}
    write_report(rows, out_dir, meta)
    return {"meta": meta, "rows": rows}
