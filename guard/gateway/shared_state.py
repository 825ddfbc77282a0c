"""State that gateway replicas share through Redis: the rate limiter's counters and the traffic monitor.

Any replica serves any account, so nothing a decision needs may live in one replica's memory alone.
- **Rate limits** (`guard.gateway.limits.RedisRateLimiter`): one Lua script per request reads and updates an account's
  sliding window in Redis.
- **The monitor** is a replicated state machine. Every request's event is appended to one Redis stream (one
  total order for all replicas, each event numbered); a replica then applies, in that order, every event up to
  its own to its `Monitor`, and answers with the action its own event gets. Every replica so derives the same
  per-account state and the same cross-account links from the same log, and a harvester who spreads its
  requests over replicas is judged exactly as on one. The monitor's work is done once per replica: it is cheap
  beside generation, which is what replicas are for.
- **Verdicts** outlive the stream: an account's verdict (degrade, throttle, block) is written to a Redis hash
  as its own request meets it, and a replica that starts loads them all before it replays the stream's recent
  events. A rolling restart, or a trim, never un-blocks a blocked harvester.

**Memory.** The stream keeps of each event only what the monitor's features read: its prompt capped at
`detectors.events.PROMPT_BYTES` (its head and tail), so its length in events bounds it in bytes too
(`SharedMonitor(max_bytes=...)`, 256 MiB by default; a replica that falls so far behind that its next events
were trimmed counts what it missed, in `distill_guard_monitor_events_missed`). Rate windows expire with their
accounts' idleness; verdicts are kept (a few hundred bytes per flagged account). Set Redis `maxmemory` above
the stream's bound plus room for the windows and verdicts, with `maxmemory-policy noeviction`: an eviction
policy would silently drop windows (limits reset) or verdicts (harvesters un-blocked), where a full Redis
refuses writes, which the gateway counts and answers as an outage.

**When Redis cannot be reached**, `fail` decides: "open" serves the request (without a rate limit; under the
monitor's last verdict for the account on this replica), "closed" answers 503. Either way the failure is logged
(at most once per `LOG_EVERY` seconds) and counted in the `distill_guard_shared_state_failures` metric. A
partitioned Redis (packets dropped, or the server paused) costs a request at most `timeout` seconds, in the
request's own thread (never the event loop, so /healthz and the other requests go on), and after `trip_after`
failures in a row the circuit breaker skips Redis altogether for `cool_down` seconds, then lets one request
try it again. An error Redis answers with (a script that fails, a key of the wrong type) is no outage: it is
raised, never answered by serving unlimited.
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

from guard.gateway.errors import APIError
from guard.gateway.store import shown_url

logger = logging.getLogger(__name__)
LOG_EVERY = 10.0  # seconds between log lines about the same outage
DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError)


def outage(error: redis.RedisError) -> bool:
    """Whether Redis could not serve at all, as opposed to an error in what it was asked. A full Redis
    (`maxmemory` under `noeviction`) is an outage too, including inside a script, where Redis 6 reports it as
    the script's error."""
    return isinstance(error, DOWN) or "OOM command not allowed" in str(error)


class Unreachable(Exception):
    """Redis could not be reached (or the breaker skipped it), and this gateway fails open: serve without it."""


class Breaker:
    """A circuit breaker: after `trip_after` failures in a row, `allow` says no for `cool_down` seconds, then yes
    to one caller (the probe) until it reports. Its lock is held for a few assignments only, never across the
    call it guards (pybreaker holds its lock across the whole call, which would serialise every Redis call of a
    replica behind one stuck in a timeout)."""

    def __init__(self, trip_after: int = 3, cool_down: float = 5.0):
        self.trip_after, self.cool_down = trip_after, cool_down
        self.failures, self.opened, self.probing = 0, -math.inf, False
        self.lock = threading.Lock()

    def allow(self) -> bool:
        with self.lock:
            if self.failures < self.trip_after:
                return True
            if self.probing or time.monotonic() - self.opened < self.cool_down:
                return False
            self.probing = True
            return True

    def record(self, ok: bool) -> None:
        with self.lock:
            self.probing = False
            self.failures = 0 if ok else self.failures + 1
            if self.failures >= self.trip_after:
                self.opened = time.monotonic()


class SharedState:
    """One gateway process's connection to Redis (`url`), what it does when Redis fails (`fail`), the circuit
    breaker in front of it, and the count of those failures by component and outcome (a metric each app
    registers)."""

    def __init__(self, url: str, fail: Literal["open", "closed"] = "open", timeout: float = 0.5,
                 prefix: str = "distill-guard", trip_after: int = 3, cool_down: float = 5.0):
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
        self.breaker = Breaker(trip_after, cool_down)
        self.failures = Counter("distill_guard_shared_state_failures", "requests served while Redis could not be "
                                "reached, by component and what was done (open: served; closed: refused)",
                                ["component", "outcome"], registry=None)
        self.missed = Counter("distill_guard_monitor_events_missed", "events of the shared monitor's stream "
                              "trimmed before this replica applied them", registry=None)
        self._logged = -math.inf

    def call(self, component: str, command, *args, **kwargs):
        """`command(*args, **kwargs)` against Redis, through the breaker. When Redis is down (or skipped), the
        failure is counted and logged, then it raises `Unreachable` (fail-open) or a 503 (fail-closed)."""
        if not self.breaker.allow():
            self.failed(component, None)
        try:
            result = command(*args, **kwargs)
        except redis.RedisError as e:
            if not outage(e):
                self.breaker.record(True)  # Redis answered: an error in what it was asked, for the caller to raise
                raise
            self.breaker.record(False)
            self.failed(component, e)
        self.breaker.record(True)
        return result

    def failed(self, component: str, error: Exception | None) -> None:
        """Count and log a failure (`error` None: skipped by the open breaker), then fail closed (a 503) or open
        (`Unreachable`)."""
        outcome = "served" if self.fail == "open" else "refused"
        self.failures.labels(component=component, outcome=outcome).inc()
        if time.monotonic() - self._logged >= LOG_EVERY:
            self._logged = time.monotonic()
            why = "circuit open after failures in a row" if error is None else type(error).__name__
            logger.error("Redis unreachable (%s: %s): %s requests are %s (fail-%s)", component, why, component,
                         outcome, self.fail)
        if self.fail == "closed":
            raise APIError(503, "The gateway's shared state is unavailable; retry shortly.", "server_error",
                           "shared_state_unavailable", headers={"retry-after": "1"})
        raise Unreachable(component)
