"""The gateway's Prometheus metrics: requests by path and status, latency, tokens served."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("distill_guard_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("distill_guard_request_seconds", "HTTP request latency by path", ["path"],
                                 registry=self.registry)
        self.tokens = Counter("distill_guard_tokens", "tokens served (completion tokens include hidden ones)",
                              ["kind"], registry=self.registry)


KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/metrics")
