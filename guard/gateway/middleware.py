"""The gateway's ASGI middleware, pure ASGI (Starlette's `@app.middleware("http")` would cost a task and a memory
stream per request): `Bounded` bounds bodies, turns the unexpected into OpenAI-shaped errors and counts every
request; `FromProxies` takes the client's address from trusted proxies only."""

from __future__ import annotations

import json
import logging
import time

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from guard.gateway.metrics import KNOWN_PATHS, Metrics
from guard.gateway.store import UNAVAILABLE

logger = logging.getLogger(__name__)


class Bounded:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before anything parses it, an
    unexpected exception becomes a generic 500 in OpenAI's shape, its traceback logged here, never sent, and
    every request is counted and timed in `metrics` (to its last byte, a stream's too). Pure ASGI: Starlette's
    `@app.middleware("http")` would cost a task and a memory stream per request."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 499  # stays so only when the client went away before any answer

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._bounded(scope, receive, counted)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"  # bounded label values
            self.metrics.requests.labels(path=path, status=str(status)).inc()
            self.metrics.latency.labels(path=path).observe(time.perf_counter() - start)

    async def _bounded(self, scope, receive, send):
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._error(send, 413, f"The request body is over the limit of {self.max_bytes} bytes.",
                                     "request_too_large")
        body, more = b"", True
        while more:  # read in full, to the limit, whatever the declared length says
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._error(send, 413, f"The request body is over the limit of {self.max_bytes} "
                                                    "bytes.", "request_too_large")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # a streaming response listens here for the client going away
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked)
        except UNAVAILABLE as e:  # no request is served without its audit row: the client may retry elsewhere
            logger.error("the store is unavailable serving %s: %s: %s", scope.get("path"), type(e).__name__, e)
            if not started:
                await self._error(send, 503, "The gateway's store is unavailable; retry shortly.",
                                  "store_unavailable", kind="server_error")
        except Exception:
            logger.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await self._error(send, 500, "The server had an error while processing your request.",
                                  kind="server_error")

    @staticmethod
    async def _error(send, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error"):
        body = json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class FromProxies:
    """ASGI middleware: behind trusted proxies (a load balancer, an upstream gateway), the client is the address
    they forward (X-Forwarded-For, read by uvicorn's own middleware), and the request remembers whether it came
    through one (`scope["state"]["via_trusted_proxy"]`), so that a header naming the end user is taken only from
    them. Anyone else's forwarding headers are ignored: a client cannot pick its address."""

    def __init__(self, app, trusted: list[str]):
        self.forwarded = ProxyHeadersMiddleware(app, trusted_hosts=trusted)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            peer = scope["client"][0] if scope.get("client") else None
            scope.setdefault("state", {})["via_trusted_proxy"] = peer in self.forwarded.trusted_hosts
        return await self.forwarded(scope, receive, send)
