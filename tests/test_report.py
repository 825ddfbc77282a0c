import json
import math

import numpy as np
import pytest

from eval.report import Outcome, bootstrap_tau, markdown_table, protection, transfer, write_report


def test_transfer_formula():
    assert transfer(student_after=0.5, student_before=0.1, teacher=0.9) == pytest.approx(0.5)
    assert transfer(0.9, 0.1, 0.9) == pytest.approx(1.0)
    # Distillation can hurt: the student ends below where it started.
    assert transfer(0.05, 0.1, 0.9) == pytest.approx(-0.0625)
    assert math.isnan(transfer(0.5, 0.6, 0.6))  # no teacher advantage to transfer


def test_protection_formula():
    assert protection(tau_defended=0.2, tau_undefended=0.8) == pytest.approx(0.75)
    assert protection(0.8, 0.8) == pytest.approx(0.0)
    assert protection(-0.1, 0.8) == pytest.approx(1.125)  # the defence made the student worse than untrained
    assert math.isnan(protection(0.1, 0.0))


def test_bootstrap_interval_covers_the_truth_and_shrinks_with_items():
    rng = np.random.default_rng(0)

    def outcome(n_items, p_after):
        teacher = np.ones((n_items, 3))
        before = np.zeros((n_items, 3))
        after = (rng.random((n_items, 3)) < p_after).astype(float)
        return Outcome(teacher, before, after)

    small, large = bootstrap_tau(outcome(100, 0.6)), bootstrap_tau(outcome(2000, 0.6))
    for stats in (small, large):
        low, high = stats["transfer"]["ci95"]
        assert low <= 0.6 <= high
    width = lambda s: s["transfer"]["ci95"][1] - s["transfer"]["ci95"][0]  # noqa: E731
    assert width(large) < width(small) / 3  # ~ 1/sqrt(20)
    defended = bootstrap_tau(outcome(2000, 0.15), reference=outcome(2000, 0.6))
    assert defended["protection"]["ci95"][0] <= 0.75 <= defended["protection"]["ci95"][1]


def test_report_schema_and_renderings(tmp_path):
    row = {"defense": "none", "attack": "naive/sft", "budget": 100, "seeds": 3, "teacher_acc": 0.95,
           "student_before_acc": 0.02, "student_after_acc": 0.01, "transfer": {"mean": -0.01, "ci95": [-0.02, 0.0]},
           "protection": None, "utility_cost": {"accuracy_drop": 0.0}}
    path = write_report([row], tmp_path, {"seeds": 3})
    report = json.loads(path.read_text())
    required = {"defense", "attack", "budget", "seeds", "teacher_acc", "student_before_acc", "student_after_acc",
                "transfer", "protection", "utility_cost"}
    assert required <= set(report["rows"][0])
    assert "student got worse" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "leakage.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "protection_vs_cost.png").stat().st_size > 1000
    assert "-0.01 [-0.02, 0.00]" in markdown_table([row])
