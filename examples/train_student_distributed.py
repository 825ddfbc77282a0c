"""A researcher with several cores (or GPUs): train a student on N processes instead of one.

Harvests a small set from the reference teacher, then trains a student on it twice with
`distill-guard train-student`: as one process, and as N data-parallel processes under torchrun. The
processes split each batch, so with the same seed and batch the two students should score the same on
the held-out questions, the second sooner.

    python examples/train_student_distributed.py --budget 500 --out runs/distributed-example

The N-process command it runs, on CPUs (gloo, one thread per process):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m guard.cli train-student HARVEST --out DIR

On a machine with 2 GPUs the same command trains on both (nccl), as does
`accelerate launch --multi_gpu --num_processes 2 -m guard.cli train-student HARVEST --out DIR`.
"""

import argparse

from eval.benchmarks.trainer_distributed import same_accuracy_p, side_by_side


def main(budget: int, processes: int, out: str, train_options: list[str]) -> None:
    students = side_by_side(budget, processes, out, train_options, threads_alone=False)
    for (n, _), student in students.items():
        accuracy = student["accuracy"]
        low, high = accuracy["ci95"]
        print(f"{n} process(es): held-out accuracy {accuracy['value']:.1%} ({accuracy['correct']}/{accuracy['total']}; "
              f"95% CI {low:.1%}-{high:.1%}), trained in {student['train_seconds']:.0f} s")
    one, many = (students[n, 1]["accuracy"]["per_item"] for n in (1, processes))
    print(f"same accuracy? exact McNemar p = {same_accuracy_p(one, many):.3g} "
          f"({sum(a != b for a, b in zip(one, many))} of {len(one)} items answered differently)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any other option goes to train-student, e.g. --steps 200 --batch-size 32.")
    parser.add_argument("--budget", type=int, default=500)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default="runs/distributed-example")
    args, train_options = parser.parse_known_args()
    main(args.budget, args.processes, args.out, train_options)
