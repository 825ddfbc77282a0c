"""The commands a newcomer runs, run as a newcomer runs them: in a subprocess."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "distill-guard"


def run(*args, timeout=300):
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_demo_prints_reasoning_accuracy_and_the_attack_table(tmp_path):
    # The README's demo with a small attack, so that it fits in the test suite's time.
    out = run(str(CLI), "demo", "--show", "3", "--budget", "64", "--steps", "20", "--eval-items", "40",
              "--out", str(tmp_path))
    accuracy = re.search(r"held-out 2-hop accuracy \(greedy\): ([\d.]+)% \((\d+)/600", out)
    assert accuracy, out
    assert float(accuracy.group(1)) >= 93.0
    assert out.count("yes") + out.count("no") >= 3
    assert "| none | naive/sft | 64 | 1 |" in out and "| none | naive/answer | 64 | 1 |" in out
    assert (tmp_path / "report.json").exists()


def test_cli_rejects_a_pickled_teacher_clearly(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    done = subprocess.run([str(CLI), "demo", "--teacher", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    said = " ".join(done.stderr.replace("│", " ").split())  # the message as one line, out of its box
    assert done.returncode == 2 and "refusing pickled weights" in said and "Traceback" not in said


def test_bring_your_own_example():
    out = run(sys.executable, "examples/bring_your_own.py", "--items", "30", "--port", str(free_port()))
    over_http, in_process = map(float, re.search(r"over HTTP: ([\d.]+)\s+in process: ([\d.]+)", out).groups())
    assert over_http == in_process >= 0.8


@pytest.mark.slow
def test_leakage_curve_example(tmp_path):
    out = run(sys.executable, "examples/leakage_curve.py", "--budgets", "32,64", "--seeds", "1", "--steps", "10",
              "--eval-items", "20", "--out", str(tmp_path))
    assert "| none | naive/sft | 64 |" in out and "| none | naive/answer | 32 |" in out
    assert (tmp_path / "leakage.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_provider_redaction_example(tmp_path):
    out = run(sys.executable, "examples/provider_redaction.py", "--budget", "48", "--steps", "10",
              "--eval-items", "20", "--out", str(tmp_path))
    assert "answer-only: 'answer: " in out and "sealed blob" in out
    for policy in ["none", "full", "answer-only", "summary", "truncate:8", "sealed"]:
        assert f"| {policy} | naive/sft | 48 |" in out
    assert (tmp_path / "report.json").exists()


@pytest.mark.slow
def test_auditor_radioactivity_example_catches_the_student_and_not_the_control(radioactivity_example):
    # The example run once for the session (conftest), at 500 queries and 200 steps: large enough that the student
    # carries the watermark clearly; a much smaller attack leaves no trace to find.
    out, out_dir = radioactivity_example
    student, control = [line for line in out.splitlines() if "smallest p =" in line]
    caught = re.search(r"trained on outputs of account 'attacker'; smallest p = (\S+) \(attacker,", student)
    assert caught and float(caught.group(1)) < 1e-4, out
    assert "teacher-b: no evidence" in control, out  # the control is never accused
    assert (out_dir / "runs" / "watermark-naive-sft-b500-s0" / "student" / "model.safetensors").exists()


@pytest.mark.slow
def test_provider_traffic_monitor_example():
    """Online, as the gateway runs it: each single-account harvester is blocked with its reason, most of the
    swarm through its linked group, and the benign kinds that ask the task's own questions get through."""
    out = run(sys.executable, "examples/provider_traffic_monitor.py")
    for kind in ("naive", "cot", "mimic"):
        assert f"{kind}: 1 of 1 accounts blocked" in out, out
        assert re.search(rf"why {kind}: \S+ -> block: p=\S+ after \d+ requests: ", out), out
    swarm = re.search(r"swarm: (\d+) of 100 accounts blocked; ([\d,]+) of 2,000 requests served", out)
    assert swarm and int(swarm.group(1)) >= 80 and int(swarm.group(2).replace(",", "")) < 1000, out
    assert re.search(r"why swarm: .* of a linked group of \d+ accounts", out), out
    for kind, accounts in (("student", 300), ("evaluator", 80)):
        blocked = re.search(rf"{kind}: (\d+) of {accounts} accounts blocked; .* \(([\d.]+)% refused\)", out)
        assert blocked and int(blocked.group(1)) <= accounts // 50 and float(blocked.group(2)) < 5.0, out


@pytest.mark.slow
def test_provider_gateway_example():
    out = run(sys.executable, "examples/provider_gateway.py", "--port", str(free_port()))
    acme = re.search(r"acme sees:  '(.*)' \((\d+) tokens billed\)", out)
    beta = re.search(r"beta sees:  '(.*)' \((\d+) tokens billed, streamed\)", out)
    assert acme and beta, out
    # the default policy shows the reasoning before the answer; beta's tier sees the answer alone
    assert acme.group(1).index("answer:") > len("reasoning") and beta.group(1).startswith("answer:")
    assert int(beta.group(2)) > len(beta.group(1).split())  # the hidden reasoning is still billed
    assert "0 of 2 clients flagged" in out and "2 not yet judged" in out, out


@pytest.mark.slow
def test_provider_replicas_example():
    """Two replicas on one PostgreSQL store and one Redis: the key's limit holds over both, and every served
    request is in the one audit log."""
    out = run(sys.executable, "examples/provider_replicas.py")
    assert "30 served and 15 refused with 429" in out and "in the shared audit log: 30 of 30" in out, out


@pytest.mark.slow
def test_serving_commands_never_fall_back_to_the_lab_unasked(tmp_path):
    """Without the provider's own master secret or benign traffic, serving a watermark or the monitor is an
    error that says what to pass; the lab's public secret and simulated users come only with --lab."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "DISTILL_GUARD_WATERMARK_KEY"}
    for defense, needed in (("watermark", "DISTILL_GUARD_WATERMARK_KEY"), ("monitor", "--benign")):
        done = subprocess.run([str(CLI), "serve", "--defense", defense, "--port", str(free_port())], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode != 0 and needed in flat(done.stderr), done.stderr[-2000:]
    done = subprocess.run([str(CLI), "evaluate", "--defense", "monitor:pace=5"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "belong to the attack" in flat(done.stderr), done.stderr[-2000:]


def flat(message: str) -> str:
    """A CLI error as words: without the panel rich draws around it or the line breaks it wraps at."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", message).split())
