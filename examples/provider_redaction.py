"""A provider's question: which reasoning-redaction policy should we ship, and what does it buy?

Shows what a client sees of one answer under each policy, then runs the real distillation attack
(harvest through the defended teacher + built-in student trainer) against each policy and prints
transfer, protection and what benign users lose.

    python examples/provider_redaction.py --budget 1000 --out runs/redaction-example
"""

import argparse

from eval.attack import AttackConfig, evaluate, lab_defense
from eval.reference import load_teacher
from eval.reference.world import reference_task
from eval.report import markdown_table
from eval.student import StudentConfig
from guard.teacher import GREEDY

POLICIES = ["full", "answer-only", "summary", "truncate:8", "sealed"]


def main(budget: int, seeds: int, steps: int | None, eval_items: int, out: str) -> None:
    teacher, task = load_teacher("reference"), reference_task()
    prompt = task.eval_items[0].prompt
    print(f"prompt: {prompt.strip()}")
    for policy in POLICIES:
        shown = lab_defense(policy, teacher).complete([prompt], GREEDY)[0]
        sealed = f"   (+ sealed blob, {len(shown.sealed_reasoning)} chars)" if shown.sealed_reasoning else ""
        print(f"  {policy:>12}: {shown.text!r}{sealed}")

    task.eval_items = task.eval_items[:eval_items]
    attack = AttackConfig(strategy="naive", student=StudentConfig(mode="sft", steps=steps))
    report = evaluate(teacher, task, ["none", *POLICIES], attack, [budget], seeds, out)
    print(markdown_table(report["rows"]))
    print(f"report: {out}/report.md")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="default: scale with the budget")
    parser.add_argument("--eval-items", type=int, default=600)
    parser.add_argument("--out", default="runs/redaction-example")
    args = parser.parse_args()
    main(args.budget, args.seeds, args.steps, args.eval_items, args.out)
