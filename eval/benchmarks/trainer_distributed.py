"""The student trainer on one process and on several (torchrun, data parallel), side by side on one harvest.

    OMP_NUM_THREADS=1 distill-guard bench trainer-distributed [--budget 1000] [--processes 2]

Both runs are `distill-guard train-student` on the naive attacker's harvest from the reference teacher, with
the same seed and the same effective batch: the processes split each batch, so they should train the same
student (held-out accuracy equal within noise) in less time. The runs go one after the other, each timed
from the command's start (process start-up included) and by the trainer itself; held-out accuracy with its
exact 95% interval, wall time and tokens/s of each are written to
eval/results/benchmarks/trainer_distributed.json. Three runs: 1 process on 1 thread; N processes on 1 thread
each (N times the cores); and 1 process on N threads, the same cores as the N processes, so the data-parallel
speed-up is read against what threads alone give on the same hardware. Run it on an otherwise idle machine with
at least N cores.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from scipy.stats import binomtest

from eval.attack import AttackConfig, harvest
from eval.benchmarks import write_result
from eval.reference import load_teacher
from eval.reference.world import reference_task


def command(processes: int, *args: str) -> list[str]:
    """`distill-guard ARGS` as one process, or as `processes` ranks under torchrun (`--standalone` picks a free
    port, so two jobs on one machine never meet)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return [sys.executable, *launcher, "-m", "guard.cli", *args]


def lab_harvest(budget: int, out: Path, seed: int = 0) -> Path:
    """The naive attacker's harvest of `budget` greedy queries to the reference teacher, in out/harvest (a stored
    one is reused)."""
    harvest(load_teacher("reference"), reference_task(), AttackConfig(budget=budget), seed, out, progress=False)
    return out / "harvest"


def train_on(harvest_dir: Path, out: Path, processes: int, options: list[str], threads: int = 1) -> dict:
    """Run train-student on `processes` processes of `threads` threads each and print what it says; its summary,
    with the command line and its wall time."""
    args = command(processes, "train-student", str(harvest_dir), "--out", str(out), *options)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"$ OMP_NUM_THREADS={threads} {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"train-student on {processes} process(es) failed:\n{done.stderr[-3000:]}")
    print(done.stdout, end="", flush=True)
    return {**json.loads((out / "train_summary.json").read_text()), "command": f"OMP_NUM_THREADS={threads} "
            + shlex.join(args), "wall_seconds": wall, "threads_per_process": threads}


def side_by_side(budget: int, processes: int, out: str | Path, options: Sequence[str] = (),
                 threads_alone: bool = True) -> dict[tuple[int, int], dict]:
    """One harvest, and a student trained on it (train-student `options`) by 1 process, by `processes` processes
    of one thread, and (`threads_alone`) by 1 process of `processes` threads: each run's summary, by (processes,
    threads per process)."""
    out = Path(out)
    harvest_dir = lab_harvest(budget, out)
    shapes = [(1, 1), (processes, 1)] + ([(1, processes)] if threads_alone else [])
    return {(n, t): train_on(harvest_dir, out / f"student-{n}-processes-{t}-threads", n, list(options), t)
            for n, t in shapes}


def same_accuracy_p(a: list[bool], b: list[bool]) -> float:
    """Exact McNemar test of two students graded on the same items: only the items they disagree on tell their
    accuracies apart, and if the two were equally capable each such item would favour either one with
    probability 1/2. Small p: one is better."""
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    return binomtest(a_only, a_only + b_only).pvalue if a_only + b_only else 1.0


def main(budget: int = 1000, processes: int = 2, steps: int | None = None, batch_size: int = 64,
         eval_items: int = 600, out: str = "runs/bench-trainer-distributed") -> dict:
    options = ["--batch-size", str(batch_size), "--eval-items", str(eval_items)]
    options += ["--steps", str(steps)] if steps else []  # default: train-student's, scaled with the harvest
    runs = side_by_side(budget, processes, out, options)
    one, many, threaded = runs[1, 1], runs[processes, 1], runs[1, processes]
    result = {"budget": budget, "training_rows": one["training_rows"], "student": one["student"],
              "eval_items": eval_items,
              "runs": [{"processes": r["processes"], "threads_per_process": r["threads_per_process"],
                        "per_device_batch": r["per_device_batch"],
                        "accuracy": r["accuracy"]["value"], "accuracy_ci95": r["accuracy"]["ci95"],
                        "final_loss": r["losses"][-1][1], "train_seconds": round(r["train_seconds"], 1),
                        "wall_seconds": round(r["wall_seconds"], 1), "tokens_per_s": round(r["tokens_per_s"]),
                        "command": r["command"]} for r in runs.values()],
              "train_speedup": round(one["train_seconds"] / many["train_seconds"], 2),
              "wall_speedup": round(one["wall_seconds"] / many["wall_seconds"], 2),
              "train_speedup_over_threads": round(threaded["train_seconds"] / many["train_seconds"], 2),
              "same_accuracy_p": same_accuracy_p(one["accuracy"]["per_item"], many["accuracy"]["per_item"]),
              "same_accuracy_p_threads": same_accuracy_p(threaded["accuracy"]["per_item"],
                                                         many["accuracy"]["per_item"])}
    print(json.dumps(result, indent=2))
    print("wrote", write_result("trainer_distributed", result))
    return result
