"""The attack through the gateway over real HTTP: `distill-guard evaluate --teacher URL` unchanged, the lab
clock's header, and a toy run of `study gateway`."""

import json
import sqlite3

import httpx
import pytest
from typer.testing import CliRunner

from conftest import live_server
from eval.harvest import load_harvest
from eval.reference.world import reference_task
from guard.cli import app
from guard.gateway.app import create_app
from guard.gateway.store import SQLiteStore
from guard.openai_teacher import OpenAITeacher
from guard.teacher import LAB_TIME_HEADER, Caller, Sampling

SIMULATED = 1_767_225_600.0  # 2026-01-01, far from the wall clock


def audit(path, account):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT prompt, response, time, status FROM audit WHERE account = ? ORDER BY time",
                          (account,)).fetchall()


def test_evaluate_cli_runs_unchanged_through_a_gateway_and_its_harvest_is_in_the_audit_log(tmp_path, teacher_a):
    reference = reference_task()
    rows = [{"prompt": i.prompt, "answer": i.answer, "split": split}
            for split, items in (("eval", reference.eval_items[:6]), ("pool", reference.query_pool[:12]))
            for i in items]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = SQLiteStore(tmp_path / "gateway.sqlite")
    key = store.create_key("harvester")
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store)) as url:
        done = CliRunner().invoke(app, ["evaluate", "--teacher", f"{url}/v1", "--api-key", key, "--model", "teacher-a",
                                        "--task", str(task), "--budgets", "8", "--seeds", "1", "--steps", "2",
                                        "--out", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    harvest = load_harvest(tmp_path / "run" / "runs" / "none-naive-sft-b8-s0")
    logged = {(prompt, response) for prompt, response, _, status in audit(store.path, "harvester") if status == 200}
    assert len(harvest) == 8
    assert set(zip(harvest["prompt"], harvest["text"])) <= logged
    store.close()


@pytest.mark.parametrize("lab_clock", [True, False])
def test_a_lab_gateway_takes_the_callers_time_from_the_header_and_any_other_ignores_it(tmp_path, teacher_a,
                                                                                        lab_clock):
    store = SQLiteStore(tmp_path / "gateway.sqlite")
    key = store.create_key("lab-user")
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, lab_clock=lab_clock)) as url:
        client = OpenAITeacher(f"{url}/v1", "teacher-a", api_key=key, lab_clock=True)
        times = [SIMULATED, SIMULATED + 90]
        client.complete(["question: where does Kalon live?\n"] * 2, Sampling(temperature=0, max_new_tokens=4),
                        [Caller(time=t) for t in times])
        bad = httpx.post(f"{url}/v1/completions", headers={"authorization": f"Bearer {key}", LAB_TIME_HEADER: "soon"},
                         json={"model": "teacher-a", "prompt": "question: where does Kalon live?\n", "max_tokens": 2})
    logged = [row[2] for row in audit(store.path, "lab-user")]
    if lab_clock:
        assert logged == times
        assert bad.status_code == 400 and LAB_TIME_HEADER in bad.json()["error"]["message"]
    else:  # the wall clock, whatever the client claims
        assert all(t > SIMULATED + 86_400 for t in logged) and len(logged) == 3
        assert bad.status_code == 200
    store.close()


@pytest.mark.slow
def test_gateway_study_runs_at_toy_scale(tmp_path, benign_detector):
    from eval import gateway_study

    report = gateway_study.main(str(tmp_path / "study"), seeds=1, budget=6, steps=2, eval_items=4,
                                replay_mix={"human": 3}, detector=benign_detector, lab_root=str(tmp_path),
                                progress=False)
    saved = json.loads((tmp_path / "study" / "report.json").read_text())
    assert saved["attacks"] == json.loads(json.dumps(report["attacks"]))
    assert [(a["defense"], a["attacker"]) for a in saved["attacks"]] == [
        ("none", "naive"), ("answer-only", "naive"), ("monitor", "naive"), ("monitor", "slow"), ("monitor", "hydra")]
    assert all(a["queries"] == 6 for a in saved["attacks"])
    # greedy answers through the gateway are the in-process ones, text for text
    assert saved["served"]["none"]["texts_identical_in_process"] == 4
    # each attacker had its own accounts, and the monitor judged them at their simulated times
    with sqlite3.connect(tmp_path / "study" / "gateway-monitor.sqlite") as db:
        first = dict(db.execute("SELECT substr(account, 1, instr(account, '@') - 1), min(time) FROM audit "
                                "WHERE account LIKE 'slow@%' OR account LIKE 'hydra@%' GROUP BY 1").fetchall())
    assert set(first) == {"slow", "hydra"} and all(t >= SIMULATED and t < SIMULATED + 86_400 for t in first.values())
    assert "| monitor | slow |" in (tmp_path / "study" / "report.md").read_text()
