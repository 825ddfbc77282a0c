"""An auditor's question without a watermark: was this suspect distilled from our teacher?

Plays both sides on the reference lab. Two attackers distil students with the built-in trainer, one from
teacher-a, one from teacher-b (which never saw teacher-a). The auditor then asks of each suspect whether it
is closer to teacher-a than every control model is, with three black-box tests, probing only questions the
attackers never asked. Controls: teacher-b, and a student of the world's own ground truth, which learned
from no teacher at all. The teacher-b suspect plays the innocent model: it must not be named.

    python examples/auditor_provenance.py --budget 1000 --out runs/provenance-example
"""

import argparse
from pathlib import Path

from eval.attack import AttackConfig, run_attack
from eval.reference import GroundTruth, load_teacher
from eval.reference.world import reference_task
from eval.student import StudentConfig
import guard.audit as audit


def distil(source, budget: int, steps: int | None, seed: int, out: Path, eval_items: int | None = None) -> str:
    """A student trained on `source`'s answers (harvested by the naive attacker); its directory. The attack also
    grades its student on the first `eval_items` held-out questions (default: all); this example reports no grades."""
    task = reference_task()
    task.eval_items = task.eval_items[:eval_items]
    run_attack(source, task, AttackConfig(budget=budget, student=StudentConfig(steps=steps)), seed, out,
               progress=False, save_student=True)
    return str(out / "student")


def main(budget: int, steps: int | None, probes: int, out: str, eval_items: int | None = None) -> None:
    out = Path(out)
    teacher, teacher_b = load_teacher("reference"), load_teacher("reference:teacher-b")
    suspects = {"student of teacher-a": distil(teacher, budget, steps, 0, out / "student-a", eval_items),
                "student of teacher-b": distil(teacher_b, budget, steps, 0, out / "student-b", eval_items)}
    controls = {"teacher-b": teacher_b, "ground-truth student":
                load_teacher(distil(GroundTruth(), budget, steps, 1, out / "control", eval_items))}
    prompts = [item.prompt for item in reference_task().eval_items[:probes]]  # held out: never harvested
    for label, path in suspects.items():
        answers, evidence = audit.gather(load_teacher(path), teacher, controls, prompts)
        result = audit.report(path, "teacher-a", prompts, answers, evidence)
        v = result["verdict"]
        tests = ", ".join(f"{name} p = {p:.3g}" for name, p in v["p_values"].items())
        print(f"{label}: {'DISTILLED from teacher-a' if v['distilled'] else 'not named'} "
              f"(Bonferroni p = {v['bonferroni']:.3g}; {tests})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=None, help="default: scale with the budget")
    parser.add_argument("--probes", type=int, default=600, help="held-out questions asked of every model")
    parser.add_argument("--eval-items", type=int, default=600,
                        help="held-out questions each attack grades its student on (the audit does not use them)")
    parser.add_argument("--out", default="runs/provenance-example")
    args = parser.parse_args()
    main(args.budget, args.steps, args.probes, args.out, args.eval_items)
