"""The online monitor: bounded memory, early blocking, and the guarded teacher as a defence."""

import gc
import tracemalloc

import numpy as np
import pytest

from detectors.detector import TrafficDetector
from detectors.events import Event
from detectors.monitor import Guarded, Monitor
from detectors.simulate import simulate
from eval.reference.world import reference_task
from guard.teacher import GREEDY


@pytest.fixture(scope="module")
def monitor_detector():
    benign, _ = simulate({"human": 120, "power": 40, "batch": 40}, days=3, seed=0)
    return TrafficDetector(target_fpr=0.01, use_embeddings=False).fit(benign)


def test_monitor_memory_stays_bounded_over_100k_events(monitor_detector):
    """300 clients, room for 200: every structure stays at its cap over 100k requests, and the traced heap
    stops growing once the caps are reached."""
    monitor = Monitor(monitor_detector, max_clients=200)
    rng = np.random.default_rng(0)
    prompts = [i.prompt for i in reference_task().query_pool]
    events = [Event(f"c{int(rng.integers(300))}", float(i), prompts[int(rng.integers(len(prompts)))])
              for i in range(100_000)]
    sizes = []
    tracemalloc.start()
    for i, event in enumerate(events[:30_000]):
        monitor.observe(event)
        if i + 1 in (10_000, 20_000, 30_000):
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    assert max(sizes[1:]) < 1.2 * sizes[0] + 1_000_000, sizes  # caps reached by 10k requests; no growth after
    for event in events[30_000:]:
        monitor.observe(event)
    assert len(monitor.states) == 200
    for state in monitor.states.values():
        assert state.digests.shape == (256,) and len(state.bands) == 256 and len(state.heap) <= 64


def test_monitor_blocks_a_naive_harvester_within_200_queries_and_lets_people_through(monitor_detector):
    monitor = Monitor(monitor_detector)
    traffic, labels = simulate({"naive": 3, "human": 30, "power": 5}, days=2, seed=21)
    seen: dict[str, int] = {}
    blocked_at: dict[str, int] = {}
    for event in traffic:
        seen[event.client] = seen.get(event.client, 0) + 1
        action = monitor.observe(event)
        if action.kind == "block" and event.client not in blocked_at:
            blocked_at[event.client] = seen[event.client]
            assert action.reason.startswith("p=") and "sd)" in action.reason
    naive = [c for c, k in labels.items() if k == "naive"]
    assert all(c in blocked_at and blocked_at[c] <= 200 for c in naive), blocked_at
    benign_blocked = [c for c in blocked_at if labels[c] != "naive"]
    assert len(benign_blocked) <= 2, benign_blocked  # 35 benign clients at a 1% target FPR


def test_guarded_teacher_refuses_a_flagged_client_and_serves_others(teacher_a, monitor_detector):
    guarded = Guarded(teacher_a, Monitor(monitor_detector), client="scraper", interval=1.0)
    prompts = [i.prompt for i in reference_task().query_pool[:300]]
    served = guarded.complete(prompts, GREEDY)
    refused = [c.finish_reason == "refused" for c in served]
    assert not any(refused[:20]) and all(refused[-50:])  # served until flagged, refused after
    assert all(c.text for c, r in zip(served, refused) if not r)
    assert guarded.log[-1].kind == "block"
