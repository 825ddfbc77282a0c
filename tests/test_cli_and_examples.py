"""The commands a newcomer runs, run as a newcomer runs them: in a subprocess."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "distill-guard"


def run(*args, timeout=300):
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_demo_prints_reasoning_and_held_out_accuracy():
    out = run(str(CLI), "demo", "--show", "3")
    accuracy = re.search(r"held-out 2-hop accuracy \(greedy\): ([\d.]+)% \((\d+)/600", out)
    assert accuracy, out
    assert float(accuracy.group(1)) >= 93.0
    assert out.count("yes") + out.count("no") >= 3


def test_cli_rejects_a_pickled_teacher_clearly(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    done = subprocess.run([str(CLI), "demo", "--teacher", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "refusing pickled weights" in done.stderr


def test_bring_your_own_example():
    out = run(sys.executable, "examples/bring_your_own.py", "--items", "30", "--port", str(free_port()))
    over_http, in_process = map(float, re.search(r"over HTTP: ([\d.]+)\s+in process: ([\d.]+)", out).groups())
    assert over_http == in_process >= 0.8
