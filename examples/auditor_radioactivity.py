"""An auditor's question: was this suspect model trained on our watermarked outputs, and from which account?

Plays both sides on the reference lab: an attacker distils a student from teacher-a served with the
watermark of account "attacker"; the auditor then tests the student (and, as a control, teacher-b) against
the keys of 12 accounts, reading the account's logged outputs through each suspect.

    python examples/auditor_radioactivity.py --budget 1000 --out runs/audit-example
"""

import argparse
from pathlib import Path

from eval.attack import AttackConfig, evaluate
from eval.harvest import load_harvest
from eval.reference import LAB_MASTER, MODELS_DIR, load_teacher
from eval.reference.world import reference_task
from eval.student import StudentConfig
from watermark.kgw import WatermarkConfig, WatermarkKey
from watermark.radioactivity import radioactivity


def main(budget: int, steps: int | None, out: str) -> None:
    attack = AttackConfig(student=StudentConfig(mode="sft", steps=steps))
    teacher = load_teacher("reference")
    evaluate(teacher, reference_task(), ["watermark"], attack, [budget], 1, out, save_students=True)
    cell = Path(out) / "runs" / f"watermark-naive-sft-b{budget}-s0"
    accounts = [WatermarkKey.for_client(LAB_MASTER, c) for c in ["attacker"] + [f"client-{i:02d}" for i in range(1, 12)]]
    harvest = load_harvest(cell)  # the account's logged outputs, as the provider holds them
    for suspect in (cell / "student", MODELS_DIR / "teacher-b"):
        report = radioactivity(str(suspect), accounts, teacher.tokenizer, mode="reading",
                               texts=(list(harvest["prompt"]), list(harvest["text"])),
                               config=WatermarkConfig(), texts_source=str(cell))
        best = min(report["detections"], key=lambda c: report["detections"][c]["p_value"])
        d = report["detections"][best]
        verdict = f"trained on outputs of account {report['client']!r}" if report["client"] else "no evidence"
        print(f"{suspect}: {verdict}; smallest p = {d['p_value']:.3g} ({best}, green {d['green']}/{d['scored']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=None, help="default: scale with the budget")
    parser.add_argument("--out", default="runs/audit-example")
    args = parser.parse_args()
    main(args.budget, args.steps, args.out)
