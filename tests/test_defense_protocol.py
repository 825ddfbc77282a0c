"""The `Defense` protocol: every request carries its caller, each attack replicate gets a fresh deployment,
and a defence that remembers callers is charged what it costs benign users by replaying their traffic."""

import numpy as np
import pytest

from conftest import BENIGN_MIX
from detectors.detector import TrafficDetector
from detectors.monitor import Monitor
from eval.attack import benign_accuracy
from eval.metrics import capability
from eval.reference.world import reference_task
from eval.traffic import served_to_benign_users, simulate
from guard.defenses import DefenseParts, build_defense
from guard.monitored import Monitored
from guard.redaction import AnswerOnly, Redact
from guard.teacher import GREEDY, Caller, Sampling
from watermark.kgw import Watermark

MASTER = b"test-master-secret-0123456789abcdef"


def test_one_caller_per_prompt_or_a_clear_error(teacher_a):
    with pytest.raises(ValueError, match="one caller per prompt"):
        teacher_a.complete(["a", "b"], GREEDY, [Caller("x")])
    with pytest.raises(ValueError, match="one caller per prompt"):
        Redact(teacher_a, AnswerOnly()).complete(["a", "b"], GREEDY, [Caller("x")])


@pytest.mark.slow
def test_fresh_rebuilds_every_layer_and_shares_no_memory(teacher_a, benign_detector):
    served = build_defense("watermark+monitor+answer-only", teacher_a,
                           DefenseParts(watermark_master=MASTER, detector=benign_detector))
    assert served.remembers_callers  # the monitor inside makes the whole stack remember
    assert not build_defense("watermark+answer-only", teacher_a, DefenseParts(watermark_master=MASTER)).remembers_callers
    assert not teacher_a.remembers_callers and teacher_a.fresh() is teacher_a
    prompts = [i.prompt for i in reference_task().query_pool[:40]]
    served.complete(prompts, GREEDY, [Caller("scraper", 1_767_225_600.0 + n) for n in range(len(prompts))])
    copy = served.fresh()
    monitored, copied = served.teacher, copy.teacher
    assert isinstance(copied, Monitored) and copied is not monitored and copied.monitor is not monitored.monitor
    assert monitored.monitor.states["scraper"].count == 40 and not copied.monitor.states
    assert isinstance(copied.teacher, Watermark) and copied.teacher.teacher is teacher_a  # the model is shared


def test_a_prompt_longer_than_the_context_is_not_generated(teacher_a):
    long = "word " * 400
    short = reference_task().eval_items[0].prompt
    out = teacher_a.complete([long, short], Sampling(temperature=0.0, max_new_tokens=16))
    assert out[0].finish_reason == "context_length" and out[0].text == "" and out[0].token_ids == []
    assert out[1].text == teacher_a.complete([short], Sampling(temperature=0.0, max_new_tokens=16))[0].text


@pytest.mark.slow
def test_benign_cost_of_the_monitor_comes_from_replaying_benign_traffic(teacher_a, benign_detector):
    """A monitor tuned to flag a third of benign accounts costs benign users accuracy, and the replay sees it;
    a capability check that bypassed the monitor (as `benign_view` once did) would report no cost at all."""
    task = reference_task()
    task.eval_items = task.eval_items[:60]
    fit, _ = simulate(BENIGN_MIX, days=3, seed=0)
    benign, _ = simulate({"human": 20, "power": 6, "batch": 3}, days=1, seed=11)
    plain, _ = capability(teacher_a, task)
    strict = Monitored(teacher_a, Monitor(TrafficDetector(target_fpr=0.3, use_embeddings=False).fit(fit)))
    accuracy, answers = benign_accuracy(strict, task, benign)
    refused = sum(a.finish_reason == "refused" for a in answers)
    assert refused > 0 and accuracy.value < plain.value  # some held-out items were asked by flagged accounts
    assert not strict.monitor.states  # measured on a fresh deployment, this one untouched
    lenient = Monitored(teacher_a, Monitor(benign_detector)).fresh()
    relaxed, _ = served_to_benign_users(lenient, task, benign)
    assert relaxed.value > accuracy.value
    # every held-out item was asked from a benign account, amid that account's own traffic
    assert set(lenient.monitor.states) <= {e.client for e in benign}
    assert sum(s.count for s in lenient.monitor.states.values()) == len(benign)


def test_a_defence_without_memory_is_charged_its_plain_capability(teacher_a):
    task = reference_task()
    task.eval_items = task.eval_items[:40]
    served = Redact(teacher_a, AnswerOnly())
    accuracy, _ = benign_accuracy(served, task, benign=None)
    assert np.array_equal(accuracy.per_item, capability(served, task)[0].per_item)
