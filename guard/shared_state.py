"""State that gateway replicas share through Redis: the rate limiter's counters and the traffic monitor.

Any replica serves any account, so nothing a decision needs may live in one replica's memory alone.
- **Rate limits** (`guard.limits.RedisRateLimiter`): one Lua script per request reads and updates an account's
  sliding window in Redis.
- **The monitor** is a replicated state machine. Every request's event is appended to one Redis stream (`XADD`:
  one total order for all replicas); a replica then applies, in that order, every event up to its own to its
  `Monitor`, and answers with the action its own event gets. Every replica so derives the same per-account state
  and the same cross-account links from the same log, and a harvester who spreads its requests over replicas
  is judged exactly as on one. The log is what lives in Redis; each replica's `Monitor` is rebuilt from it (a
  replica that starts replays the `max_events` most recent events). The monitor's work is done once per
  replica: it is cheap beside generation, which is what replicas are for.

When Redis cannot be reached, `fail` decides: "open" serves the request (without a rate limit; under the
monitor's last verdict for the account on this replica), "closed" answers 503. Either way the failure is logged
(at most once per `LOG_EVERY` seconds) and counted in the `distill_guard_shared_state_failures` metric.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Literal

import redis
from prometheus_client import Counter
from redis.backoff import NoBackoff
from redis.retry import Retry

from detectors.events import Event
from detectors.monitor import ALLOW, Action, Monitor
from guard.errors import APIError
from guard.store import shown_url

logger = logging.getLogger(__name__)
LOG_EVERY = 10.0  # seconds between log lines about the same outage

class SharedState:
    """One gateway process's connection to Redis (`url`), what it does when Redis fails (`fail`), and the count
    of those failures by component and outcome (a metric each app registers)."""

    def __init__(self, url: str, fail: Literal["open", "closed"] = "open", timeout: float = 1.0,
                 prefix: str = "distill-guard"):
        if fail not in ("open", "closed"):
            raise ValueError(f"when Redis is down a gateway fails 'open' or 'closed', not {fail!r}")
        self.fail, self.prefix = fail, prefix  # the prefix of every key: gateways sharing one Redis each have one
        # No retries inside the client: a request waits at most `timeout` for Redis, then `fail` decides.
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                          retry=Retry(NoBackoff(), 0), decode_responses=True)
        try:
            self.redis.ping()
        except redis.RedisError as e:
            raise ValueError(f"cannot reach Redis at {shown_url(url)}: {e}") from None
        self.failures = Counter("distill_guard_shared_state_failures", "requests served while Redis could not be "
                                "reached, by component and what was done (open: served; closed: refused)",
                                ["component", "outcome"], registry=None)
        self._logged = -math.inf

    def failed(self, component: str, error: Exception) -> None:
        """Count and log a failure, then fail closed (a 503) or return to serve the request."""
        outcome = "served" if self.fail == "open" else "refused"
        self.failures.labels(component=component, outcome=outcome).inc()
        if time.monotonic() - self._logged >= LOG_EVERY:
            self._logged = time.monotonic()
            logger.error("Redis unreachable (%s: %s): %s requests are %s (fail-%s)", component,
                         type(error).__name__, component, outcome, self.fail)
        if self.fail == "closed":
            raise APIError(503, "The gateway's shared state is unavailable; retry shortly.", "server_error",
                           "shared_state_unavailable", headers={"retry-after": "1"})


class SharedMonitor:
    """A `Monitor` that judges the events of every replica sharing `shared`'s Redis, in one order (see the module
    docstring). It answers `observe` as `Monitor` does, so `Monitored` takes either."""

    def __init__(self, monitor: Monitor, shared: SharedState, max_events: int = 100_000):
        self.monitor, self.shared, self.max_events = monitor, shared, max_events
        self.detector, self.settings = monitor.detector, monitor.settings
        self.stream = f"{shared.prefix}:monitor:events"
        self.applied = "0-0"  # the id of the last event of the stream this replica's monitor has seen
        self.lock = threading.Lock()
        newest = shared.redis.xrevrange(self.stream, count=1)
        if newest:  # a replica that starts beside running ones first replays what they have seen
            with self.lock:
                self._catch_up(newest[0][0], None)

    def observe(self, event: Event) -> Action:
        fields = {name: str(value) for name, value in vars(event).items() if value is not None}
        with self.lock:  # one catch-up at a time: events reach the monitor in the stream's order only
            try:
                mine = self.shared.redis.xadd(self.stream, fields, maxlen=self.max_events, approximate=True)
                return self._catch_up(mine, event.client)
            except redis.RedisError as e:
                self.shared.failed("monitor", e)
                return self.monitor.actions.get(event.client, ALLOW)

    def _catch_up(self, mine: str, client: str | None) -> Action:
        """Applies every event after the last one applied, up to `mine`; the action `mine` gets."""
        while True:
            events = self.shared.redis.xrange(self.stream, min=f"({self.applied}", max=mine, count=1000)
            if not events:  # `mine` was trimmed away before it was read (a stream far too short for the load)
                return self.monitor.actions.get(client, ALLOW)
            for event_id, fields in events:
                action = self.monitor.observe(_event(fields))
                self.applied = event_id
                if event_id == mine:
                    return action


def _event(fields: dict[str, str]) -> Event:
    return Event(client=fields["client"], time=float(fields["time"]), prompt=fields["prompt"],
                 prompt_tokens=int(fields.get("prompt_tokens", 0)),
                 response_tokens=int(fields.get("response_tokens", 0)), endpoint=fields.get("endpoint", "chat"),
                 ip=fields.get("ip"), payment=fields.get("payment"))
