"""train-student on two processes (torchrun, gloo on CPU) trains the student that one process trains, and only
rank 0 writes and reports. The example runs both, as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eval.benchmarks.trainer_distributed import same_accuracy_p
from eval.trainer import per_device_batch
from guard import cli
from guard.hf_teacher import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_train_the_student_one_process_trains(tmp_path):
    # CI-sized (about 50 s on 2 cores, mostly process start-up): 256 greedy answers, 40 steps at batch 32.
    example = [sys.executable, "examples/train_student_distributed.py", "--budget", "256", "--out", str(tmp_path),
               "--steps", "40", "--batch-size", "32", "--lr", "3e-3", "--warmup-steps", "4", "--eval-items", "300"]
    done = subprocess.run(example, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"student-{n}-processes-1-threads" / "train_summary.json").read_text()) for n in (1, 2))
    assert (one["processes"], one["per_device_batch"], two["processes"], two["per_device_batch"]) == (1, 32, 2, 16)

    # Same start, same seeded order, same rows in each step (each rank takes half): the loss curves agree to float
    # rounding (about 1e-6 relative). A rank that takes a whole batch of its own, or trains alone because it never
    # joined the others, changes the rows of the very first step and so the first logged loss by far more.
    assert [s for s, _ in one["losses"]] == [s for s, _ in two["losses"]]
    for (step, alone), (_, together) in zip(one["losses"], two["losses"]):
        assert abs(alone - together) <= 1e-3 * alone, (step, alone, together)

    # Equally capable within noise, on the same held-out items: only the items the two students answer differently
    # tell their accuracies apart, and if they were equally capable each would favour either with probability 1/2
    # (exact McNemar). At this size both students get almost nothing right (0-1%), so this catches only a gross
    # failure; the loss curves above carry the fine check (`bench trainer-distributed` compares accuracy at ~20%).
    assert one["accuracy"]["total"] == two["accuracy"]["total"] == 300
    assert same_accuracy_p(one["accuracy"]["per_item"], two["accuracy"]["per_item"]) > 0.01

    # Rank 0 alone writes and reports: one summary per run, and nothing but the harvest and the two students.
    assert done.stdout.count("trained on 256 rows") == 2, done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["harvest", "student-1-processes-1-threads",
                                                       "student-2-processes-1-threads"]
    load_causal_lm(tmp_path / "student-2-processes-1-threads")  # a student the project's loaders read


def test_train_student_errors_are_clear(tmp_path, monkeypatch):
    """In process (typer's runner): the real command, without a fresh interpreter's start-up."""
    done = CliRunner().invoke(cli.app, ["train-student", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")])
    said = " ".join(done.output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
    assert done.exit_code == 2 and "no harvest shards" in said and "Traceback" not in done.output, done.output
    assert not (tmp_path / "s").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the command checks the batch this way on rank 0
    assert per_device_batch(32) == 16
    with pytest.raises(ValueError, match="batch size 33 does not split evenly over 2 processes"):
        per_device_batch(33)
