"""Every defence is validated the same way: a real harvest and a real student, defence on and off.

One undefended attack (1,000 queries, 500 training steps) is the reference for two defences at once."""

from dataclasses import replace

import pytest

from eval.attack import AttackConfig, evaluate, lab_parts
from eval.reference.world import reference_task
from eval.traffic import simulate


@pytest.mark.slow
def test_answer_only_and_the_monitor_both_cut_real_transfer(teacher_a, benign_detector, tmp_path):
    # the monitor's cost to benign users: a day of a small benign population carries the 600 held-out items
    benign, _ = simulate({"human": 30, "power": 8, "batch": 4}, days=1, seed=101)
    # The default student, not a cheaper one (tried, one thread): at 300 steps each the undefended transfer's CI
    # starts at 0.046 and the monitor's protection is negative; at batch 32 (half the work per step) the monitor's
    # protection CI starts at 0.0. At the default (500 steps; the monitor's 832 served rows train 416) it is
    # 0.25 [0.11, 0.38], undefended transfer 0.22 [0.19, 0.26].
    parts = replace(lab_parts([]), detector=benign_detector)  # the lab's parts, its detector fitted once per run
    report = evaluate(teacher_a, reference_task(), ["none", "answer-only", "monitor"], AttackConfig(), budgets=[1000],
                      seeds=1, out_dir=tmp_path, progress=False, benign=benign, parts=parts)
    rows = {r["defense"]: r for r in report["rows"]}
    assert rows["none"]["transfer"]["ci95"][0] > 0.05  # the undefended attack works at this budget
    for defense in ("answer-only", "monitor"):
        low, high = rows[defense]["protection"]["ci95"]
        assert low > 0, (defense, rows[defense]["protection"])
    assert rows["answer-only"]["teacher_acc"] == rows["none"]["teacher_acc"]  # answers untouched, reasoning gone
    assert rows["answer-only"]["utility_cost"]["answers_changed"] == 0
    assert rows["answer-only"]["utility_cost"]["reasoning_shown"] == 0.0
    # the monitor's cost is what the replayed benign users lost: never a gain, and measured, not assumed zero
    assert rows["monitor"]["teacher_acc"] <= rows["none"]["teacher_acc"]
    assert rows["monitor"]["utility_cost"]["answers_changed"] == round(
        (rows["none"]["teacher_acc"] - rows["monitor"]["teacher_acc"]) * 600)
    assert rows["monitor"]["queries"] == 1000  # the attacker spent its budget; most of it was refused
