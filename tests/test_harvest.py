import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from detectors.monitor import Monitor
from eval.harvest import Budget, Harvester, HarvestMismatch, load_harvest
from eval.reference.world import parse_question, reference_task
from eval.strategies import decompose, naive
from eval.traffic import ShapedClient, TrafficShape
from guard.monitored import Monitored
from guard.teacher import Sampling

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = Sampling(temperature=1.0, seed=11, max_new_tokens=48)
MANIFEST = {"teacher": "teacher-a", "strategy": "naive", "seed": 0}

HARVEST_SCRIPT = textwrap.dedent("""
    import sys
    from eval.harvest import Budget, Harvester
    from eval.reference.world import parse_question, reference_task
    from eval.strategies import naive
    from guard.hf_teacher import HFTeacher
    from guard.teacher import Sampling
    from eval.reference import MODELS_DIR
    h = Harvester(HFTeacher(MODELS_DIR / "teacher-a"), sys.argv[1], Budget(int(sys.argv[2])),
                  Sampling(temperature=1.0, seed=11, max_new_tokens=48),
                  {"teacher": "teacher-a", "strategy": "naive", "seed": 0}, chunk_size=8, progress=False)
    naive(reference_task(), seed=0)(h)
    h.close()
""")


def harvest(teacher, out, budget, strategy=naive, chunk_size=8, sampling=SAMPLING):
    h = Harvester(teacher, out, Budget(budget), sampling, MANIFEST, chunk_size=chunk_size, progress=False)
    pairs = strategy(reference_task(), seed=0)(h)
    return pairs, h.close()


@pytest.mark.slow
def test_killed_harvest_resumes_without_loss_or_duplicates(teacher_a, tmp_path):
    budget = 400
    proc = subprocess.Popen([sys.executable, "-c", HARVEST_SCRIPT, str(tmp_path / "killed"), str(budget)], cwd=ROOT)
    shards = tmp_path / "killed" / "shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(shards.glob("shard-*[0-9]"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(shards.glob("shard-*[0-9]")))
    assert 3 <= written < budget // 8, "the kill should land mid-harvest"

    _, resumed = harvest(teacher_a, tmp_path / "killed", budget)
    _, straight = harvest(teacher_a, tmp_path / "straight", budget)
    stored = load_harvest(tmp_path / "killed")
    assert stored["index"] == list(range(budget))  # nothing lost, nothing twice
    assert stored["text"] == straight["text"] and resumed["prompt"] == straight["prompt"]


def test_budget_is_enforced_in_queries_and_tokens(teacher_a, tmp_path):
    pairs, ds = harvest(teacher_a, tmp_path / "q", 50)
    assert len(ds) == 50 == len(pairs)
    h = Harvester(teacher_a, tmp_path / "t", Budget(1000, tokens=300), SAMPLING, MANIFEST, chunk_size=8,
                  progress=False)
    naive(reference_task(), seed=0)(h)
    rows = h.close()
    assert sum(rows["completion_tokens"]) >= 300 > sum(rows["completion_tokens"][:-8])  # stops after the chunk that crosses


def test_resuming_with_other_settings_is_refused(teacher_a, tmp_path):
    harvest(teacher_a, tmp_path / "h", 16)
    with pytest.raises(HarvestMismatch, match="other settings"):
        Harvester(teacher_a, tmp_path / "h", Budget(16), Sampling(temperature=0.5, seed=11), MANIFEST, progress=False)


def test_decompose_asks_only_one_hop_questions_and_writes_chains(teacher_a, tmp_path):
    pairs, ds = harvest(teacher_a, tmp_path / "d", 300, strategy=decompose, chunk_size=32,
                        sampling=Sampling(temperature=0.0, max_new_tokens=48))
    assert len(ds) <= 300
    assert all(len(parse_question(p).hops) == 1 for p in ds["prompt"])  # the teacher saw 1-hop questions only
    two_hop = [(p, c) for p, c in pairs if len(parse_question(p).hops) == 2]
    assert len(two_hop) > 20
    task = reference_task()
    gold = {i.prompt: i.answer for i in task.query_pool}
    accuracy = sum(task.is_correct(c.text, gold[p]) for p, c in two_hop) / len(two_hop)
    assert accuracy > 0.9  # chains assembled from the teacher's 1-hop answers are mostly right


def test_decompose_builds_no_chain_on_a_refused_answer(teacher_a, benign_detector, tmp_path):
    """Behind the monitor most sub-questions are refused; a refusal is not a fact to build a chain on."""
    # a metronome clock (no jitter) is blocked at its 25th request, so most of the 200 sub-questions are refused
    monitored = ShapedClient(Monitored(teacher_a, Monitor(benign_detector)), TrafficShape(pace=2.0, jitter=0.0))
    pairs, ds = harvest(monitored, tmp_path / "d", 200, strategy=decompose, chunk_size=32,
                        sampling=Sampling(temperature=0.0, max_new_tokens=48))
    served = [c for c in ds["finish_reason"] if c != "refused"]
    assert len(served) < len(ds)  # the monitor did refuse
    two_hop = [(p, c) for p, c in pairs if len(parse_question(p).hops) == 2]
    task = reference_task()
    gold = {i.prompt: i.answer for i in task.query_pool}
    assert all(task.is_correct(c.text, gold[p]) for p, c in two_hop)  # only chains of served facts, all right
    assert len(pairs) - len(two_hop) == len(served)  # the 1-hop rows are the served answers, no refusal
