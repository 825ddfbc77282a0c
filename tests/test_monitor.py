"""The online monitor: bounded memory, early blocking, and the monitored teacher as a defence."""

import gc
import time
import tracemalloc

import numpy as np
import pytest

from detectors.events import Event
from detectors.monitor import Monitor
from eval.reference.world import reference_task
from eval.traffic import ShapedClient, TrafficShape, simulate
from guard.defenses import Monitored, parse_defense
from guard.teacher import GREEDY, Caller


def test_monitor_memory_stays_bounded_over_100k_events(benign_detector):
    """300 clients, room for 200: every structure stays at its cap over 100k requests, and the traced heap
    stops growing once the caps are reached."""
    monitor = Monitor(benign_detector, max_clients=200)
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


def test_monitor_blocks_a_naive_harvester_within_200_queries_and_lets_people_through(benign_detector):
    monitor = Monitor(benign_detector)
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


def test_monitored_teacher_refuses_a_flagged_account_and_serves_others(teacher_a, benign_detector):
    """The defence acts per account: a harvesting account is refused once flagged, while another account on
    the same deployment, asking at the same time, is still served."""
    monitored = Monitored(teacher_a, Monitor(benign_detector))
    prompts = [i.prompt for i in reference_task().query_pool[:300]]
    start = 1_767_225_600.0
    callers = [Caller("scraper", start + n) for n in range(len(prompts))]
    served = monitored.complete(prompts, GREEDY, callers)
    refused = [c.finish_reason == "refused" for c in served]
    assert not any(refused[:20]) and all(refused[-50:])  # served until flagged, refused after
    assert all(c.text for c, r in zip(served, refused) if not r)
    assert monitored.monitor.actions["scraper"].kind == "block"
    bystander = monitored.complete(prompts[:3], GREEDY, [Caller("someone-else", start + 301 + n) for n in range(3)])
    assert all(c.finish_reason != "refused" and c.text for c in bystander)
    # the next replicate of the attack meets the deployment fresh, not already blocked by this one
    again = monitored.fresh().complete(prompts[:20], GREEDY, callers[:20])
    assert all(c.finish_reason != "refused" for c in again)
    assert "scraper" in monitored.monitor.actions  # and the fresh copy did not wipe the original's memory


def test_monitored_teacher_reads_the_wall_clock_when_the_caller_gives_no_time(teacher_a, benign_detector):
    monitored = Monitored(teacher_a, Monitor(benign_detector))
    before = time.time()
    monitored.complete(["question: where does Kalon live?\n"], GREEDY, [Caller("live-user")])
    state = monitored.monitor.states["live-user"]
    assert before <= state.last <= time.time()


def test_a_throttled_client_is_served_at_the_throttle_rate_and_never_faster(benign_detector):
    """throttle_factor = 1 / target_fpr throttles every judged client that is not blocked outright."""
    monitor = Monitor(benign_detector, throttle_factor=1 / benign_detector.target_fpr, throttle_per_hour=4)
    traffic, _ = simulate({"power": 1}, days=2, seed=5)
    actions = [monitor.observe(event) for event in traffic]
    times = np.array([e.time for e in traffic])
    assert all(a.served for a in actions[:24]) and actions[-1].kind == "throttle"
    served = times[24:][[a.served for a in actions[24:]]]
    assert len(served) < len(times[24:]) / 2  # the throttle binds for this client
    for a, b in zip(served, served[1:]):
        assert b - a >= 900  # never faster than 4 an hour
        assert not ((times >= a + 900) & (times < b)).any()  # and the first request after the gap goes through


def test_a_swarm_below_the_first_checkpoint_goes_unjudged_online_while_a_small_one_is_blocked(teacher_a, benign_detector):
    """The honest limit of per-account monitoring: an account is judged from its 25th request, so a swarm
    whose accounts each send fewer is served in full; the same harvest from 3 accounts is cut to ~25 each."""
    prompts = [i.prompt for i in reference_task().query_pool[:300]]
    for accounts, most_served in ((20, 300), (3, 3 * 30)):
        monitored = Monitored(teacher_a, Monitor(benign_detector))
        client = ShapedClient(monitored, TrafficShape(pace=2.0, accounts=accounts))
        served = sum(c.finish_reason != "refused" for c in client.complete(prompts, GREEDY))
        assert len(monitored.monitor.states) == accounts
        assert (served == 300) if accounts == 20 else (3 * 24 <= served <= most_served), (accounts, served)


def test_hydra_cover_traffic_goes_through_the_defence_in_the_same_account(teacher_a, benign_detector):
    monitored = Monitored(teacher_a, Monitor(benign_detector))
    ShapedClient(monitored, TrafficShape(pace=60.0, cover=3.0)).complete(
        [i.prompt for i in reference_task().query_pool[:200]], GREEDY)
    seen = monitored.monitor.states["attacker"].count
    assert abs(seen - 800) <= 5 * np.sqrt(600), seen  # 200 attack requests + Poisson(3 x 200) cover requests


def test_traffic_shapes_belong_to_the_attack_and_bad_ones_fail_early():
    for bad, message in ((dict(accounts=0), "accounts >= 1"), (dict(pace=-2), "pace > 0"), (dict(cover=-1), "cover >= 0")):
        with pytest.raises(ValueError, match=message):
            TrafficShape(**bad)
    with pytest.raises(ValueError, match="belong to the attack"):
        parse_defense("monitor:pace=5,accounts=100")


def test_traffic_benchmark_smoke():
    """Smoke test: the monitor benchmark still runs as the detector's requirements change. Not timed here."""
    from eval.benchmarks.traffic_speed import monitor_speed

    result = monitor_speed(2_000)
    assert result["events"] == 2_000 and result["events_per_s"] > 0
