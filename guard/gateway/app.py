"""An OpenAI-compatible server for any Teacher: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

The gateway, assembled: routes are thin (`guard.gateway.routes`), auth is a dependency (`guard.gateway.auth`),
and the teacher (defences and all) is created once in the lifespan. `stream=True` answers in OpenAI's server-sent-event chunks. Generation
is not token-streamed: a completion is generated whole, then sent out through the `StreamRedactor` of the
caller's redaction policy (its key's, else the gateway's), so a policy that may withhold reasoning sends
nothing until the end and never takes back what it sent. The admin API (`/admin`) is `guard.gateway.admin`'s.

Bounds answer in OpenAI's error shape, never as a 500 with a traceback: a body over `max_body_bytes` is 413
before it is parsed; prompt plus `max_tokens` beyond the model's context, more than `max_prompts` prompts,
and malformed JSON are 400; a store that cannot be reached is a 503 (nothing is served without its audit row);
anything unexpected is a 500 with a generic message, logged here in full.

In front of an upstream (an `OpenAITeacher`: vLLM, a vendor API) the gateway is a proxy: an upstream that times
out is a 504, one that fails or answers garbage a 502 (its credentials refused too: the provider's to fix), and
an upstream 4xx that is the request's own fault reaches the client as that 4xx with the upstream's message.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from guard.gateway.admin import admin_digest, retention_kept
from guard.gateway.admin import router as admin_router
from guard.gateway.auth import KeyCache
from guard.gateway.batcher import Batcher
from guard.gateway.errors import APIError
from guard.gateway.limits import RateLimiter, RedisRateLimiter
from guard.gateway.metrics import Metrics
from guard.gateway.middleware import Bounded, FromProxies
from guard.gateway.policies import Policies
from guard.gateway.routes import metrics_router, router
from guard.gateway.shared_state import SharedState
from guard.gateway.store import Store
from guard.openai_teacher import TeacherAuthError, TeacherHTTPError, TeacherRequestError, TeacherTimeout
from guard.redaction import Full, Policy, Sealer, Summarize
from guard.teacher import Teacher

logger = logging.getLogger(__name__)
MiB = 1 << 20


def create_app(load_teacher: Callable[[], Teacher], model_name: str, api_keys: set[str] | None = None,
               sealer: Sealer | None = None, policy: Policy | None = None, max_body_bytes: int = MiB,
               max_prompts: int = 64, store: Store | None = None, rate_window: float = 60.0,
               batch_window: float = 0.0, max_batch: int = 16, max_queue: int = 1024,
               summarize: Summarize | None = None,
               admin_key: str | None = None, retention: float | None = None,
               key_cache_seconds: float = 5.0, lab_clock: bool = False,
               shared: SharedState | None = None, trusted_proxies: list[str] | None = None,
               end_user_header: str | None = None, public_docs: bool = False,
               metrics_on_api_port: bool = True) -> FastAPI:
    """Serve the teacher that `load_teacher` builds (called once, at start-up) as `model_name`.

    Args:
        policy: the gateway's redaction, applied on top of the teacher to whole answers and, through its
            `StreamRedactor`, to streams, for every account whose key names no policy of its own (a key's
            policy, `keys create --policy`, takes its place). None serves the teacher's text as it comes
            (`Full`).
        sealer: seals reasoning for the `sealed` policy (the gateway's or an account's) and opens the sealed
            reasoning clients hand back. Without one, a live key with the `sealed` policy is a ValueError here,
            and a `sealed` key created while the gateway runs is refused with 403 (`policy_unavailable`).
        summarize: writes the `summary` policy's summaries (default: an outline that tells nothing).
        max_body_bytes: larger request bodies are refused with 413.
        max_prompts: the most prompts one completions request may carry.
        store: API keys (hashed) and their accounts, and the audit log: each request's row is durable before
            its response is sent. Without it, `api_keys` (if any) are accepted as accounts key-0, key-1, ...
        rate_window: seconds over which each account's requests per minute and tokens per minute (from the
            store) are counted; a minute, as the limits say, except in tests.
        batch_window, max_batch: concurrent requests reach the teacher in batches (`guard.gateway.batcher`): those queued
            while it generates, and those that arrive within `batch_window` seconds, up to `max_batch`;
            `max_batch=1` serialises them. At most `max_queue` prompts wait; past that a request is a 503 with
            Retry-After, and a client that goes away while it waits has its prompts dropped, never generated.
        admin_key: enables the admin API (`guard.gateway.admin`) behind this key; it needs `store`. Only its digest
            is kept.
        retention: seconds an audit row is kept; older rows are purged at start-up and then periodically.
        key_cache_seconds: how long a key the store resolved is taken without asking the store again, so the
            longest a revoked key is still served (`KeyCache`); 0 asks the store on every request.
        lab_clock: a lab gateway: each caller's time (what the monitor judges, and the audit row's time) is the
            simulated time its client sends in the `LAB_TIME_HEADER`. Never in production.
        shared: Redis, shared with the other replicas of this gateway: the rate limits are counted there (a
            monitor among the teacher's defences shares its state through `DefenseParts.shared`), and its
            failures are counted in this app's metrics.
        trusted_proxies: addresses or networks (CIDR) of the proxies in front of the gateway (a load balancer,
            an upstream gateway): from them, the client's address is the one they forward (X-Forwarded-For), so
            that accounts behind one balancer are not all on its network. From anyone else forwarding headers
            are ignored. None trusts no one.
        end_user_header: a header in which a trusted proxy names the end user it serves under one key; the
            monitor and the audit log then see each end user as "account/user" (rate limits stay the key's).
        public_docs: serve `/docs`, `/redoc` and `/openapi.json` (a map of the API for anyone who asks: off unless
            wanted).
        metrics_on_api_port: serve the Prometheus metrics at `/metrics` on this app, behind the admin key when
            the gateway has one. False when they are served on a port of their own (`serve --metrics-port`).
    """
    if (admin_key is not None or retention is not None) and store is None:
        raise ValueError("the admin API and retention act on the audit log: they need a store (--store)")
    policies = Policies(policy or Full(), sealer, summarize)
    for account in store.list_keys() if store is not None else ():
        if not account.revoked:
            try:
                policies(account.policy)  # built now, once; a tier this gateway cannot serve stops it here
            except ValueError as e:
                raise ValueError(f"the key {account.key_id} of account {account.name!r} has the policy "
                                 f"{account.policy!r}: {e}") from None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.teacher = load_teacher()
        app.state.batcher = Batcher(batch_window, max_batch, max_queue).start()
        async with retention_kept(store, retention):
            yield
        app.state.batcher.stop()
        app.state.teacher = None

    documented = {} if public_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="distill-guard teacher server", lifespan=lifespan, **documented)
    app.state.model_name, app.state.api_keys = model_name, sorted(api_keys or ())
    app.state.sealer, app.state.max_prompts = sealer, max_prompts  # for the routes (`guard.gateway.routes`)
    limiter = RateLimiter(rate_window) if shared is None else RedisRateLimiter(shared, rate_window)
    app.state.store, app.state.limiter, app.state.metrics = store, limiter, Metrics()
    if shared is not None:
        app.state.metrics.registry.register(shared.failures)
        app.state.metrics.registry.register(shared.missed)
    app.state.policies = policies
    app.state.admin_digest = None if admin_key is None else admin_digest(admin_key)
    app.state.keys = KeyCache(key_cache_seconds)
    app.add_middleware(Bounded, max_bytes=max_body_bytes, metrics=app.state.metrics)
    app.add_middleware(FromProxies, trusted=trusted_proxies or [])
    app.state.end_user_header = end_user_header.lower() if end_user_header else None
    app.include_router(admin_router)
    app.state.lab_clock = lab_clock
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(TeacherHTTPError, upstream_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.include_router(router)
    if metrics_on_api_port:
        app.include_router(metrics_router)
    return app


async def api_error(request: Request, exc: APIError):
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


UPSTREAM_FAILURES = {  # the first that fits is what the client is told (no upstream address or key in it; the log
    # has the rest)
    TeacherTimeout: ("The upstream model server did not answer in time.", "upstream_timeout"),
    TeacherAuthError: ("The upstream model server refused the gateway's upstream credentials; the provider must "
                       "fix the gateway's upstream key.", "upstream_auth_failed"),
    TeacherHTTPError: ("The upstream model server failed to answer.", "upstream_failed"),
}


async def upstream_error(request: Request, exc: TeacherHTTPError):
    logger.warning("upstream error serving %s: %s", request.url.path, exc)
    headers, status = {}, exc.status
    if isinstance(exc, TeacherRequestError) and exc.status == 429:  # the upstream limits the gateway's key
        error = {"message": "The upstream model server is busy; retry after the time in Retry-After.",
                 "type": "rate_limit_error", "code": "upstream_rate_limited"}
        headers = {"retry-after": exc.retry_after or "1"}
    elif isinstance(exc, TeacherRequestError) and exc.status != 404:  # the request's own fault: the client
        # fixes it, told what the upstream said (a context over its limit)
        error = {"message": exc.message, "type": exc.kind, "code": exc.code}
    else:  # a 404 is the gateway's configuration (an upstream model or route that is not there), not the client's
        message, code = next(told for kind, told in UPSTREAM_FAILURES.items() if isinstance(exc, kind))
        error = {"message": message, "type": "server_error", "code": code}
        status = 502 if isinstance(exc, TeacherRequestError) else exc.status
    return JSONResponse({"error": error}, status_code=status, headers=headers)


async def http_error(request: Request, exc: StarletteHTTPException):
    # the framework's own errors (an unknown path, a body it cannot parse) in the same shape as ours
    return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "code": None}},
                        status_code=exc.status_code, headers=exc.headers)


async def invalid_request(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    told = "this server does not take this field" if first.get("type") == "extra_forbidden" else first.get("msg")
    message = f"{where}: {told or 'invalid request'}" if where else told or "invalid request"
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": None}},
                        status_code=400)


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serve_in_thread(app: FastAPI, port: int | None = None, start_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn on loopback (`port`, or a free one) in a thread of this process for the
    duration of the block, which gets the base URL: for tests, experiments and notebooks. A deployment runs
    `distill-guard gateway` instead."""
    # Bound here and handed to uvicorn: a port merely found free could be taken by another process (another
    # test worker) before uvicorn bound it.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own bind does
    listener.bind(("127.0.0.1", 0 if port is None else port))
    port = listener.getsockname()[1]
    # proxy_headers off: which proxies are trusted is the app's to say (`trusted_proxies`), not uvicorn's default
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           proxy_headers=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()
