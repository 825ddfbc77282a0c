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
import time
from dataclasses import dataclass, replace
from pathlib import Path

from eval.attack import AttackConfig, run_attack
from eval.reference import GroundTruth, load_teacher
from eval.reference.world import reference_task
from eval.student import StudentConfig


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


def train(suspect: Suspect, out: Path, progress: bool = False) -> Path:
    """The suspect's checkpoint, trained once (a finished one is kept; a killed one starts over)."""
    where = student_dir(out, suspect)
    if (where / "student" / "model.safetensors").exists():
        return where / "student"
    config = StudentConfig(mode=suspect.mode)
    if suspect.lora_on:
        base = student_dir(out, next(s for s in ZOO if s.name == suspect.lora_on)) / "student"
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
        base = suspect.lora_on and student_dir(out, next(s for s in ZOO if s.name == suspect.lora_on))
        while base and not (base / "trained.json").exists():
            time.sleep(30)  # the other worker is still training the base
        started = time.perf_counter()
        train(suspect, out)
        print(f"[worker {worker}] {suspect.name}: {time.perf_counter() - started:.0f} s", flush=True)
