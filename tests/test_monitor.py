"""The online monitor: bounded memory, early blocking, and the monitored teacher as a defence."""

import gc
import sys
import time
import tracemalloc
from dataclasses import replace
from types import FunctionType, ModuleType

import numpy as np
import pytest

from detectors.detector import TrafficDetector
from detectors.events import Event
from detectors.features import CHECKPOINTS
from detectors.monitor import Monitor
from eval.reference.world import reference_task
from conftest import BENIGN_MIX
from eval.traffic import COT_PREFIXES, QUESTIONS, TOPICS, VERBS, ShapedClient, TrafficShape, simulate
from guard.defenses import parse_defense
from guard.monitored import Monitored
from guard.teacher import GREEDY, Caller


@pytest.mark.slow
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
    linker = monitor.linker
    assert len(linker.summaries) <= 200 and len(linker.parent) <= 200 and len(linker.first) <= 200
    assert len(linker.unlinked) <= 20 and len(monitor.pooled) <= 200
    assert sum(map(len, linker.index.by_start.values())) == len(linker.summaries)
    for state in monitor.states.values():
        assert state.digests.shape == (256,) and len(state.bands) == 256 and len(state.heap) <= 64


@pytest.mark.slow
def test_monitor_memory_stays_bounded_over_100k_answered_accounts(benign_detector):
    """100,000 accounts, one answered question each, room for 1,000: the questions kept for the campaign
    test are forgotten with their account's state, and the traced heap stops growing once the caps are
    reached. (It grew by 34 MB here while the linker kept the first requests of every account that never
    sent its fifth: those were evicted only when some account did.)"""
    monitor = Monitor(benign_detector, max_clients=1_000)
    prompts = [i.prompt for i in reference_task().query_pool]
    sizes = []
    tracemalloc.start()
    for i in range(100_000):
        prompt = prompts[i % len(prompts)]
        monitor.observe(Event(f"account-{i}", float(i), prompt))
        monitor.answered(f"account-{i}", prompt, "the answer names Zzvq and Qqxr.")
        if i + 1 in (20_000, 60_000, 100_000):
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    assert max(sizes[1:]) < 1.1 * sizes[0] + 1_000_000, sizes
    assert len(monitor.states) == 1_000 and len(monitor.questions.questions) <= 1_000


def deep_size(root) -> int:
    """Bytes held by `root` and everything it reaches (a numpy view counts the array it pins), classes,
    modules and functions aside: they are shared, not held."""
    seen, stack, total = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, ModuleType, FunctionType)):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack += gc.get_referents(obj)
        if isinstance(obj, np.ndarray) and obj.base is not None:
            stack.append(obj.base)
    return total


@pytest.mark.slow
def test_memory_per_client_stays_flat_from_2k_to_100k_requests_with_embeddings_on():
    """One client, 100,000 requests, judged with embeddings at every checkpoint of every window, each answered.
    Most of its prompts repeat (so the test embeds few), but a steady share are new, and they reach the judged
    samples: an embedding cache that kept every prompt would grow by more than a megabyte."""
    questions = [q.format(v=v, t=t) for q in QUESTIONS for v in VERBS for t in TOPICS]
    rng = np.random.default_rng(0)
    start = 1_767_254_400.0
    benign = [Event(f"user-{c}", float(t), questions[int(rng.integers(len(questions)))])
              for c in range(40) for t in start + np.cumsum(rng.exponential(120, 80))]
    detector = TrafficDetector(target_fpr=0.25, n_neighbors=5, reference_size=32, embedding_cache=256).fit(benign)
    cache = detector.embedder_.cache
    assert len(cache) >= 256  # the fit alone embedded as many prompts as the cache keeps

    def prompt(i: int) -> str:
        return f"{questions[i % 30]} (ticket {i})" if rng.random() < 0.03 else questions[int(rng.integers(30))]

    monitor = Monitor(detector)
    times = start + np.cumsum(rng.exponential(120, 100_000))
    sizes = {}
    for i, t in enumerate(times, 1):
        asked = prompt(i)
        monitor.observe(Event("long-lived", float(t), asked))
        # every answer names something new: what the client learned, and the questions it was answered, are
        # kept in fixed rings and a capped log, not one entry per answer
        monitor.answered("long-lived", asked, f"see {''.join(chr(97 + int(c)) for c in rng.integers(0, 26, 9))}")
        if i in (2_000, 100_000):
            sizes[i] = deep_size(monitor)
    assert sizes[100_000] - sizes[2_000] < 64_000, sizes
    tickets = [int(p.rsplit(" ", 1)[1].rstrip(")")) for p in cache if "(ticket " in p]
    assert len(tickets) > 50 and min(tickets) > 2_000  # new prompts were embedded all along: the cache turned over


def test_a_client_that_turns_to_harvesting_after_10k_benign_requests_is_blocked_within_a_window(benign_detector):
    """A power user's 10,000 requests, then a scripted harvest from the same account. The checkpoints of
    the client's first window are long past; later windows are judged afresh, so the harvest is blocked
    before it has sent a window's worth of requests, and the offline detector, replaying the same log,
    flags it at the same request."""
    life, _ = simulate({"power": 1}, days=30, seed=1)
    assert len(life) >= 10_000
    life = life[:10_000]
    client = life[0].client
    harvest, _ = simulate({"naive": 1}, days=1, seed=1, attack_budget=2_000)
    shift = life[-1].time + 60 - harvest[0].time
    traffic = life + [replace(e, client=client, time=e.time + shift) for e in harvest]
    monitor = Monitor(benign_detector)
    actions = [monitor.observe(event) for event in traffic]
    assert all(a.kind == "allow" for a in actions[:10_000])  # judged through its benign life and let through
    blocked_at = next((n for n, a in enumerate(actions, 1) if a.kind == "block"), None)
    assert blocked_at is not None and blocked_at - 10_000 <= CHECKPOINTS[-1], blocked_at
    assert benign_detector.score(traffic)[client]["queries_to_flag"] == blocked_at


def test_a_blocked_client_stays_blocked_after_its_state_is_evicted_until_its_flag_is_too(benign_detector):
    """States are kept for `max_clients` clients, flags for `max_flagged`: a harvester that returns after its
    state was evicted is still blocked; once its flag is evicted too it is a new client again."""
    monitor = Monitor(benign_detector, max_clients=2, max_flagged=3)
    prompts = [i.prompt for i in reference_task().query_pool]
    clock = iter(range(1_767_225_600, 1_767_225_600 + 10**6, 2))

    def harvest(client: str, requests: int = 900):
        actions = [monitor.observe(Event(client, float(next(clock)), prompts[i])) for i in range(requests)]
        assert len(monitor.actions) <= 3
        return actions

    assert harvest("h0")[-1].kind == "block"
    harvest("h1")
    harvest("h2")
    assert "h0" not in monitor.states
    back = harvest("h0", 1)[0]
    assert back.kind == "block" and not back.served
    assert set(monitor.actions) == {"h0", "h1", "h2"}
    for client in ("h3", "h4", "h5"):
        assert harvest(client)[-1].kind == "block"
    assert set(monitor.actions) == {"h3", "h4", "h5"}
    assert harvest("h0", 1)[0].kind == "allow"


def test_throttled_clients_next_allowed_times_are_kept_only_while_their_flags_are(benign_detector):
    """throttle_factor = 1 / target_fpr throttles every judged client not blocked outright; with room for
    5 flags, at most 5 next-allowed times are kept, each for a client whose flag is a throttle."""
    monitor = Monitor(benign_detector, throttle_factor=1 / benign_detector.target_fpr, max_flagged=5)
    traffic, _ = simulate({"human": 20, "power": 5, "naive": 2}, days=1, seed=8)
    flagged = set()
    for event in traffic:
        if monitor.observe(event).kind != "allow":
            flagged.add(event.client)
        assert len(monitor.actions) <= 5
        assert set(monitor.next_served) <= {c for c, a in monitor.actions.items() if a.kind == "throttle"}
    assert len(flagged) > 5 and len(monitor.next_served) > 0


def test_monitor_blocks_a_naive_harvester_once_it_asks_more_than_evaluation_customers_and_lets_people_through(
        benign_detector):
    """An evaluation customer asks what a harvester asks, as a harvester does, up to a few hundred questions:
    a harvester is blocked at the first checkpoint past what such customers send (800), the people asking the
    same questions (students, evaluation customers) are let through."""
    monitor = Monitor(benign_detector)
    traffic, labels = simulate({"naive": 3, "human": 30, "power": 5, "student": 30, "evaluator": 10}, days=2,
                               seed=21)
    seen: dict[str, int] = {}
    blocked_at: dict[str, int] = {}
    for event in traffic:
        seen[event.client] = seen.get(event.client, 0) + 1
        action = monitor.observe(event)
        if action.kind == "block" and event.client not in blocked_at:
            blocked_at[event.client] = seen[event.client]
            assert action.reason.startswith("p=") and "sd)" in action.reason
    naive = [c for c, k in labels.items() if k == "naive"]
    assert all(c in blocked_at and blocked_at[c] <= 800 for c in naive), blocked_at
    benign_blocked = [c for c in blocked_at if labels[c] != "naive"]
    assert len(benign_blocked) <= 2, benign_blocked  # 75 benign clients at a 1% target FPR


def test_monitored_teacher_refuses_a_flagged_account_and_serves_others(teacher_a, benign_detector):
    """The defence acts per account: a harvesting account is refused once flagged, while another account on
    the same deployment, asking at the same time, is still served."""
    monitored = Monitored(teacher_a, Monitor(benign_detector))
    # a harvester asking for every intermediate step: nobody else does, so it is judged from its 25th request
    prompts = [COT_PREFIXES[0] + i.prompt for i in reference_task().query_pool[:300]]
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


def test_a_swarm_of_100_accounts_with_their_own_payments_and_networks_is_linked_and_blocked_online(benign_detector):
    """Each account sends 20 requests, fewer than the first checkpoint, and shares no payment fingerprint and
    no network with the others: linked by their script's clock and their joint coverage, the group's pooled
    traffic is judged as one client and most of the swarm is blocked before it has sent half its harvest.
    Without linking, every request is served. The benign users around it stay in no judged group."""
    traffic, labels = simulate({**{k: n // 4 for k, n in BENIGN_MIX.items()}, "swarm": 1}, days=2, seed=31)
    swarm = {c for c, k in labels.items() if k == "swarm"}
    assert len(swarm) == 100 and len({e.payment for e in traffic if e.client in swarm}) == 100
    assert len({e.ip.rsplit(".", 1)[0] for e in traffic if e.client in swarm}) == 100
    for link in (True, False):
        monitor = Monitor(benign_detector, link=link)
        served = {c: 0 for c in labels}
        blocked = set()
        for event in traffic:
            action = monitor.observe(event)
            served[event.client] += action.served
            if action.kind == "block":
                blocked.add(event.client)
        if link:
            assert len(blocked & swarm) >= 80 and sum(served[c] for c in swarm) < 1000, len(blocked & swarm)
            assert len(blocked - swarm) <= 2
        else:
            assert not blocked & swarm and sum(served[c] for c in swarm) == 2000


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


@pytest.mark.slow
def test_traffic_benchmark_smoke():
    """Smoke test: the monitor benchmark still runs as the detector's requirements change. Not timed here."""
    from eval.benchmarks.traffic_speed import monitor_speed

    result = monitor_speed(2_000)
    assert result["events"] == 2_000
    assert result["with_linking"]["events_per_s"] > 0 and result["without_linking"]["events_per_s"] > 0


def test_linked_group_sizes_stay_exact_as_accounts_are_evicted(benign_detector):
    """Three groups of three accounts, linked by their shared payments, through a linker that keeps five
    accounts: as members are evicted (the oldest first, a group's first account among them), each group's size
    is the number of its members still kept, never a count that forgot an evicted member or restarted at 1."""
    from detectors.cluster import TOGETHER, Linker
    from detectors.features import LINK_AT

    linker = Linker(benign_detector.popularity_, benign_detector.rare_key_surprisal_, max_accounts=5)
    prompts = [i.prompt for i in reference_task().query_pool]
    for group in range(3):
        start = 1_767_225_600 + group * 3 * TOGETHER  # apart, so that only their payments link them
        for member in range(3):
            for n in range(LINK_AT):
                linker.observe(Event(f"g{group}-{member}", start + 60.0 * member + 7.0 * n, prompts[n],
                                     payment=f"card-{group}"))
            for linked in range(group + 1):  # the members of each group that the linker still keeps
                kept = {c for c in list(linker.parent) if c.startswith(f"g{linked}-")}
                roots = {linker.root(c) for c in kept}
                assert len(roots) <= 1, f"group {linked} split into {roots}"
                if kept:
                    assert linker.group_size(roots.pop()) == len(kept), (linked, kept, linker.members)
    assert len(linker.parent) <= 5


def test_accounts_behind_one_network_are_compared_with_a_bounded_number_of_its_accounts(benign_detector):
    """Many accounts behind one network (a NAT, a balancer no proxy setting sees through) start over days, so
    only the network could link them: each new one is compared with at most `max_per_network` of them, the
    most recent, not with every account ever seen there; accounts of that network that start together still
    link."""
    from detectors.cluster import TOGETHER, Linker
    from detectors.features import LINK_AT

    linker = Linker(benign_detector.popularity_, benign_detector.rare_key_surprisal_, max_per_network=32)
    prompts = [i.prompt for i in reference_task().query_pool]
    for n_account in range(203):  # the last three start together
        start = 1_767_225_600 + min(n_account, 200) * 3 * TOGETHER + 60.0 * max(0, n_account - 200)
        for n in range(LINK_AT):
            linker.observe(Event(f"office-{n_account}", start + 7.0 * n, prompts[(n_account + n) % len(prompts)],
                                 ip="203.0.113.9"))
    [network] = linker.index.by_network
    assert len(linker.index.by_network[network]) == 32
    assert linker.root("office-202") is not None
    assert linker.root("office-200") == linker.root("office-201") == linker.root("office-202")
