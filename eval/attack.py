"""The distillation attack and the evaluation that measures it: harvest, student, transfer.

    Task -> Teacher (defended) -> Harvest -> Student -> Report

`evaluate` runs every (defence, budget, seed) cell, scores the teacher as served and each student
before and after distillation on the same held-out items, and reports transfer and protection with
bootstrap intervals.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from detectors.events import Event
from eval.harvest import Budget, Harvester, completion_row
from eval.metrics import capability
from eval.reference import LAB_MASTER, plan_or_outline
from eval.report import Outcome, bootstrap_tau, paired_difference, write_report
from eval.strategies import DEFAULT_TEMPERATURE, STRATEGIES
from eval.student import StudentConfig, init_student, train_student
from eval.task import Task
from eval.traffic import ShapedClient, TrafficShape, lab_detector, served_to_benign_users, simulate
from guard.defenses import DefenseParts, build_defense, parse_defense
from guard.hf_teacher import HFTeacher
from guard.prompts import prompt_format
from guard.teacher import Sampling, Teacher


REUSE_ONLY = "DISTILL_GUARD_REUSE_ONLY"


class StudentNotCached(RuntimeError):
    """A student would have to be trained while DISTILL_GUARD_REUSE_ONLY forbids it."""


@dataclass
class AttackConfig:
    strategy: str = "naive"
    budget: int = 2000
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, max_new_tokens=64))
    temperature: float | None = None  # overrides sampling.temperature; None: the strategy's default
    student: StudentConfig = field(default_factory=StudentConfig)
    traffic: TrafficShape = field(default_factory=TrafficShape)  # accounts, pace and cover of the harvest


def correctness(teacher: Teacher, task: Task) -> np.ndarray:
    return capability(teacher, task)[0].per_item


def harvest(teacher: Teacher, task: Task, config: AttackConfig, seed: int, out_dir: Path, defense: str = "none",
            progress: bool = True) -> tuple[list[dict], int]:
    """The attacker's training rows and the number of queries spent; resumes a stored harvest."""
    if config.strategy not in STRATEGIES:
        raise ValueError(f"unknown attacker strategy {config.strategy!r}; choose one of {sorted(STRATEGIES)}")
    sampling = harvest_sampling(config, seed)
    harvester = Harvester(teacher, out_dir / "harvest", Budget(config.budget), sampling,
                          manifest={"teacher": teacher.name, "prompt_format": prompt_format(teacher.tokenizer),
                                    "defense": defense, "task": task.name,
                                    "strategy": config.strategy, "seed": seed, "traffic": asdict(config.traffic)},
                          progress=progress)
    pairs = STRATEGIES[config.strategy](task, seed)(harvester)
    queries = len(harvester.close())
    pairs = [(p, c) for p, c in pairs if c.finish_reason != "refused"]  # a refusal teaches nothing; its query is spent
    return [completion_row(i, prompt, completion) for i, (prompt, completion) in enumerate(pairs)], queries


def harvest_sampling(config: AttackConfig, seed: int | None) -> Sampling:
    """The decoding a harvest really uses: the strategy's temperature unless the config overrides it, top-k
    logprobs when the student distils logits, and a seed per replicate (None: not yet tied to one)."""
    temperature = DEFAULT_TEMPERATURE[config.strategy] if config.temperature is None else config.temperature
    sampling = replace(config.sampling, seed=None if seed is None else seed * 1_000_003, temperature=temperature)
    if config.student.mode == "kd" and not sampling.logprobs:
        sampling = replace(sampling, logprobs=20)
    return sampling


def student_before(config: StudentConfig, task: Task, cache_dir: Path | None = None) -> np.ndarray:
    """Per-item correctness of the untrained student, shared by every cell with the same start."""
    key = _digest({"init": config.init, "seed": config.seed, "lora": config.lora, "lora_r": config.lora_r,
                   **graded_on(task)})
    saved = cache_dir / f"before-{key}.json" if cache_dir else None
    if saved is not None and saved.exists():
        return np.array(json.loads(saved.read_text()), dtype=bool)
    model, tokenizer = init_student(config)
    before = correctness(HFTeacher("student-before", model=model, tokenizer=tokenizer), task)
    if saved is not None:
        _write_json(saved, before.tolist())
    return before


def train_and_score(rows: list[dict], task: Task, config: StudentConfig, out_dir: Path,
                    progress: bool = True, save: bool = False) -> dict:
    """Train one student on `rows` and grade it on the task's held-out items; `save` keeps it (safetensors)
    in out_dir/student, for audits."""
    start = time.perf_counter()
    if rows:
        model, tokenizer, result = train_student(rows, config, output_dir=str(out_dir / "trainer"), progress=progress)
    else:  # every query was refused: the attacker is left with the student it started from
        (model, tokenizer), result = init_student(config), None
    after = correctness(HFTeacher("student-after", model=model, tokenizer=tokenizer), task)
    saved = {}
    if save:
        model.save_pretrained(out_dir / "student", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "student")
        saved["student_path"] = str(out_dir / "student")
    losses = result.losses if result else []
    return {**saved, "after": after, "train_seconds": time.perf_counter() - start,
            "tokens_per_s": result.tokens_per_s if result else 0.0, "final_loss": losses[-1][1] if losses else None,
            "first_loss": losses[0][1] if losses else None, "training_rows": len(rows)}


def training_key(rows: list[dict], config: StudentConfig, task: Task) -> str:
    """Identifies a student by everything its training and grading see: identical keys, identical students."""
    fields = ("prompt", "text", "token_ids", "top_ids", "top_logprobs") if config.mode == "kd" else ("prompt", "text")
    return _digest({"rows": [[r[f] for f in fields] for r in rows], "student": asdict(config), **graded_on(task)})


def graded_on(task: Task) -> dict:
    """What a student's grades depend on besides the student: the held-out prompts, and the answer length when
    it is not the default (so that keys from before it could be set still name the same students)."""
    return {"eval": [i.prompt for i in task.eval_items],
            **({"max_new_tokens": task.max_new_tokens} if task.max_new_tokens != 64 else {})}


def run_attack(teacher: Teacher, task: Task, config: AttackConfig, seed: int, out_dir: Path,
               defense: str = "none", progress: bool = True, cache_dir: Path | None = None,
               save_student: bool = False) -> dict:
    """One harvest and one student; returns per-item correctness of the student before and after.

    With `cache_dir`, a student whose training rows and settings match one trained before is not
    trained again (redaction policies that show a student the same text, e.g. sealed and answer-only).
    With the environment variable DISTILL_GUARD_REUSE_ONLY set, a student missing from the cache is an error
    instead of an hour of training: committed cells are re-derived that way from their cached students.
    """
    rows, queries = harvest(teacher, task, config, seed, out_dir, defense, progress)
    student_config = replace(config.student, seed=seed)
    before = student_before(student_config, task, cache_dir)
    key = training_key(rows, student_config, task)
    saved = cache_dir / f"student-{key}.json" if cache_dir else None
    cached = json.loads(saved.read_text()) if saved is not None and saved.exists() else None
    if cached is not None and (not save_student or _checkpoint_kept(cached)):
        trained = {**cached, "reused": str(saved.name)}
        trained["after"] = np.array(trained["after"], dtype=bool)
    else:
        if os.environ.get(REUSE_ONLY):
            kept = " with its checkpoint kept" if save_student else ""
            raise StudentNotCached(f"{out_dir}: {REUSE_ONLY} forbids training, and {cache_dir} holds no student "
                                   f"trained on these rows{kept}")
        trained = train_and_score(rows, task, student_config, out_dir, progress, save=save_student)
        if saved is not None:
            _write_json(saved, {**trained, "after": trained["after"].tolist()})
    return {**trained, "before": before, "queries": queries, "training_key": key}


def run_cell(teacher: Teacher, task: Task, config: AttackConfig, seed: int, cell_dir: Path, defense: str,
             progress: bool, cache_dir: Path | None = None, save_student: bool = False) -> dict:
    """One finished attack, from cell.json when an earlier (perhaps killed) evaluation already ran it."""
    settings = {"config": asdict(config), "seed": seed, "defense": defense, "teacher": teacher.name,
                **{("eval_prompts" if k == "eval" else k): v for k, v in graded_on(task).items()}}
    saved = cell_dir / "cell.json"
    if saved.exists():
        cell = json.loads(saved.read_text())
        if cell.get("settings") == json.loads(json.dumps(settings)) and (not save_student or _checkpoint_kept(cell)):
            if cache_dir is not None and "training_key" not in cell:
                _share_trained(cell, teacher, task, config, seed, cell_dir, defense, cache_dir)
                _write_json(saved, cell)
            return {**cell, "before": np.array(cell["before"]), "after": np.array(cell["after"])}
    cell = run_attack(teacher, task, config, seed, cell_dir, defense, progress, cache_dir, save_student)
    _write_json(saved, {**{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in cell.items()},
                        "settings": settings})
    return cell


def _share_trained(cell: dict, teacher: Teacher, task: Task, config: AttackConfig, seed: int, cell_dir: Path,
                   defense: str, cache_dir: Path) -> None:
    """Enter a cell finished before students were cached into the cache (its harvest replays from disk)."""
    rows, _ = harvest(teacher, task, config, seed, cell_dir, defense, progress=False)
    cell["training_key"] = key = training_key(rows, replace(config.student, seed=seed), task)
    saved = cache_dir / f"student-{key}.json"
    if not saved.exists():
        fields = ("after", "train_seconds", "tokens_per_s", "final_loss", "first_loss", "training_rows")
        _write_json(saved, {f: cell.get(f) for f in fields})


def _checkpoint_kept(record: dict) -> bool:
    """Whether a stored result's student checkpoint is still on disk (results are committed, checkpoints not)."""
    return bool(record.get("student_path")) and Path(record["student_path"]).is_dir()


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


def _write_json(path: Path, value) -> None:
    """Atomically, so a killed run never leaves a half-written result behind (and two processes writing the
    same cached student each write a file of their own, then replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value) + "\n")
    tmp.replace(path)


# Benign users whose traffic carries the held-out items through a defence that remembers callers: a seed the
# lab's detector was not fitted on, one day, a sixth of the fitting population's size.
BENIGN_REPLAY = {"human": 40, "power": 14, "batch": 14, "student": 50, "evaluator": 14}


def lab_parts(defenses: list[str]) -> DefenseParts:
    """The reference lab's defence parts: its public watermark secret, its summariser, and a detector fitted
    on its simulated benign traffic (fitted only when a defence uses the monitor)."""
    monitored = any(kind == "monitor" for d in defenses for kind, _ in parse_defense(d))
    return DefenseParts(watermark_master=LAB_MASTER, summarize=plan_or_outline,
                        detector=lab_detector() if monitored else None)


def lab_defense(spec: str, teacher: Teacher) -> Teacher:
    """`teacher` under defence `spec`, built from the reference lab's parts."""
    return build_defense(spec, teacher, lab_parts([spec]))


def benign_accuracy(served: Teacher, task: Task, benign: list[Event] | None):
    """The teacher as a benign user is served: plain capability, or, for a defence that remembers callers,
    the held-out items asked amid replayed benign traffic."""
    if not served.remembers_callers:
        return capability(served, task)
    if benign is None:
        benign, _ = simulate(BENIGN_REPLAY, days=1, seed=101)
    return served_to_benign_users(served.fresh(), task, benign)


def reasoning_words(completions) -> int:
    return sum(len((c.reasoning or "").split()) for c in completions)


def evaluate(teacher: Teacher, task: Task, defenses: list[str], attack: AttackConfig, budgets: list[int],
             seeds: int, out_dir: str | Path, progress: bool = True, save_students: bool = False,
             parts: DefenseParts | None = None, benign: list[Event] | None = None,
             students: str | Path | None = None, served_as: dict[str, tuple] | None = None) -> dict:
    """Every defence x budget x seed; writes report.json, report.md and plots to `out_dir`. With
    `save_students`, each trained student is kept (safetensors) in its cell's `student/` for audits.

    `parts`: what the defences need (default: the reference lab's, `lab_parts`). `benign`: the benign traffic
    replayed through a defence that remembers callers, to measure what it costs benign users (default: the
    lab's simulated users). `students`: the cache of trained students' scores (default `out_dir/students`);
    evaluations that share one train a student only once for the same training rows. `served_as`: by defence,
    (Accuracy, completions) of the teacher as benign users are served, where already measured (a remote gateway
    that remembers callers, measured once for several attacks); "none"'s is also the undefended baseline."""
    out_dir = Path(out_dir)
    students = Path(students) if students else out_dir / "students"
    start = time.perf_counter()
    served_as = served_as or {}
    baseline, undefended = served_as["none"] if "none" in served_as else capability(teacher, task)
    parts = lab_parts(defenses) if parts is None else parts
    served_by = {defense: build_defense(defense, teacher, parts) for defense in defenses}
    served_accuracy, reasoning_shown, accuracy_drop = {}, {}, {}
    for defense, served in served_by.items():
        accuracy, completions = served_as.get(defense) or benign_accuracy(served, task, benign)
        served_accuracy[defense] = accuracy
        reasoning_shown[defense] = reasoning_words(completions) / max(1, reasoning_words(undefended))
        # what the defence costs a benign user, paired item by item against the undefended teacher
        accuracy_drop[defense] = paired_difference(baseline.per_item, accuracy.per_item)
    outcomes, rows = {}, []
    for defense, served in served_by.items():
        for budget in budgets:
            cells = []
            for seed in range(seeds):
                name = f"{defense.replace(':', '-')}-{attack.strategy}-{attack.student.mode}-b{budget}-s{seed}"
                # each attack meets a fresh deployment, from the accounts and at the pace of its traffic shape
                attacked = ShapedClient(served.fresh(), attack.traffic, seed)
                cells.append(run_cell(attacked, task, replace(attack, budget=budget), seed, out_dir / "runs" / name,
                                      defense, progress, cache_dir=students, save_student=save_students))
            teacher_matrix = np.repeat(served_accuracy[defense].per_item[:, None], seeds, axis=1).astype(float)
            outcome = Outcome(teacher_matrix, np.stack([c["before"] for c in cells], 1).astype(float),
                              np.stack([c["after"] for c in cells], 1).astype(float))
            outcomes[defense, budget] = outcome
            reference = outcomes.get(("none", budget)) if defense != "none" else None
            stats = bootstrap_tau(outcome, reference)
            drop = accuracy_drop[defense]
            rows.append({
                "defense": defense, "attack": f"{attack.strategy}/{attack.student.mode}", "budget": budget,
                "seeds": seeds, "teacher_acc": served_accuracy[defense].value,
                "teacher_acc_ci95": list(served_accuracy[defense].clopper_pearson()),
                "teacher_refused": served_accuracy[defense].refused,  # items never answered (context length)
                "student_before_acc": float(outcome.before.mean()),
                "student_after_acc": float(outcome.after.mean()), "transfer": stats["transfer"],
                "protection": stats.get("protection"),
                "utility_cost": {"accuracy_drop": drop["mean"], "accuracy_drop_ci95": drop["ci95"],
                                 "answers_changed": drop["items_changed"],
                                 "reasoning_shown": reasoning_shown[defense]},
                "queries": int(np.mean([c["queries"] for c in cells])),
                "train_seconds": float(np.mean([c["train_seconds"] for c in cells])),
                "student_tokens_per_s": float(np.mean([c["tokens_per_s"] for c in cells])),
            })
    meta = {"teacher": teacher.name, "prompt_format": prompt_format(teacher.tokenizer), "task": task.name, "eval_items": len(task.eval_items),
            # the sampling the harvests used, not the config's unresolved default
            "attack": {**asdict(attack), "sampling": asdict(harvest_sampling(attack, seed=None))},
            "budgets": budgets, "seeds": seeds,
            "wall_seconds": round(time.perf_counter() - start, 1)}
    write_report(rows, out_dir, meta)
    return {"meta": meta, "rows": rows}
