"""A researcher's question: how much of teacher-a's capability leaks as the attacker's budget grows?

Runs the real attack (harvest + built-in student trainer) at several budgets and draws the leakage
curve (transfer against budget) for two students: one trained on full reasoning (sft) and one on
answers alone (answer), the baseline that reasoning redaction is measured by.

    python examples/leakage_curve.py --budgets 500,2000 --seeds 1 --out runs/leakage-example
"""

import argparse

from eval.attack import AttackConfig, evaluate
from eval.reference.world import reference_task
from eval.report import markdown_table, plot_leakage
from eval.student import StudentConfig
from eval.reference import load_teacher


def main(budgets: list[int], seeds: int, steps: int, out: str, eval_items: int) -> None:
    teacher, task = load_teacher("reference"), reference_task()
    task.eval_items = task.eval_items[:eval_items]
    rows = []
    for mode in ("sft", "answer"):
        attack = AttackConfig(strategy="naive", student=StudentConfig(mode=mode, steps=steps))
        rows += evaluate(teacher, task, ["none"], attack, budgets, seeds, f"{out}/{mode}")["rows"]
    plot_leakage(rows, f"{out}/leakage.png")
    print(markdown_table(rows))
    print(f"leakage curve: {out}/leakage.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="500,2000")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="default: scale with the budget")
    parser.add_argument("--eval-items", type=int, default=600)
    parser.add_argument("--out", default="runs/leakage-example")
    args = parser.parse_args()
    main([int(b) for b in args.budgets.split(",")], args.seeds, args.steps, args.out, args.eval_items)
