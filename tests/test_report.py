import json
import math

import numpy as np
import pytest

from eval.report import (Outcome, bootstrap_tau, budget_to_reach, markdown_table, merge_reports, paired_difference,
                         protection, transfer, write_report)


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


def test_paired_difference_interval_follows_the_items_that_changed():
    rng = np.random.default_rng(0)
    before = rng.random(600) < 0.9
    assert paired_difference(before, before) == {"mean": 0.0, "ci95": [0.0, 0.0], "items_changed": 0}
    after = before.copy()
    after[np.flatnonzero(before)[:60]] = False  # 60 of 600 answers lost: a drop of 0.10
    drop = paired_difference(before, after)
    assert drop["mean"] == pytest.approx(0.1) and drop["items_changed"] == 60
    # paired: the spread is that of a binomial share of 60 changes among 600 items, sd = sqrt(0.1 * 0.9 / 600)
    sd = np.sqrt(0.1 * 0.9 / 600)
    assert drop["ci95"][0] == pytest.approx(0.1 - 1.96 * sd, abs=0.4 * sd)
    assert drop["ci95"][1] == pytest.approx(0.1 + 1.96 * sd, abs=0.4 * sd)
    row = {**_row("answer-only", "naive/sft", 100, 0.1), "teacher_acc_ci95": [0.81, 0.86],
           "utility_cost": {"accuracy_drop": drop["mean"], "accuracy_drop_ci95": drop["ci95"]}}
    assert "0.980 [0.810, 0.860]" in markdown_table([row]) and "accuracy −0.100 [0.0" in markdown_table([row])


def _row(defense, attack, budget, tau):
    return {"defense": defense, "attack": attack, "budget": budget, "seeds": 1, "teacher_acc": 0.98,
            "student_before_acc": 0.0, "student_after_acc": tau * 0.98, "transfer": {"mean": tau, "ci95": [tau, tau]},
            "protection": None, "utility_cost": {"accuracy_drop": 0.0, "reasoning_shown": 0.0}}


def test_budget_to_reach_interpolates_in_log_budget_and_says_when_it_is_a_bound():
    curve = [_row("d", "a", b, t) for b, t in [(500, 0.1), (1000, 0.3), (4000, 0.5)]]
    assert budget_to_reach(curve, 0.2) == (pytest.approx(np.sqrt(500 * 1000)), "at")  # half way in log budget
    assert budget_to_reach(curve, 0.4) == (pytest.approx(2000), "at")
    assert budget_to_reach(curve, 0.05) == (500, "below")
    assert budget_to_reach(curve, 0.9) == (4000, "above")
    # a strategy that ran out of things to ask: the queries it spent count, not its budget
    spent = [{**r, "queries": min(r["budget"], 1200)} for r in curve]
    assert budget_to_reach(spent, 0.4) == (pytest.approx(1200 ** 0.5 * 1000 ** 0.5), "at")


def test_merged_report_carries_query_multipliers(tmp_path):
    naive = [_row("none", "naive/sft", b, t) for b, t in [(500, 0.1), (1000, 0.2), (2000, 0.6)]]
    naive += [_row("answer-only", "naive/sft", b, 0.05) for b in (500, 1000, 2000)]
    decompose = [_row("answer-only", "decompose/sft", b, t) for b, t in [(500, 0.2), (1000, 0.4), (2000, 0.8)]]
    write_report(naive, tmp_path / "naive")
    write_report(decompose, tmp_path / "decompose")
    merged = merge_reports([tmp_path / "naive", tmp_path / "decompose" / "report.json"], tmp_path / "all")
    assert len(merged["rows"]) == 9
    m = {(x["defense"], x["attack"], x["reference_budget"]): x for x in merged["meta"]["query_multipliers"]}
    assert m["answer-only", "decompose/sft", 2000]["multiplier"] == pytest.approx(np.sqrt(2) / 2)  # 1,414 match 2,000
    assert m["answer-only", "decompose/sft", 500]["bound"] == "below"
    assert m["answer-only", "naive/sft", 2000]["bound"] == "above"
    assert m["none", "naive/sft", 1000]["multiplier"] == pytest.approx(1.0)
    text = (tmp_path / "all" / "report.md").read_text()
    assert "| answer-only | decompose/sft | ≤1.00× | ≤0.50× | 0.71× |" in text
    assert "| none | 0.10 | 0.20 | 0.60 |" in text  # the curve table, one per attack
    assert (tmp_path / "all" / "leakage.png").read_bytes()[:4] == b"\x89PNG"
