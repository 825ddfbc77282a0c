"""State that gateway replicas share through Redis: the rate limiter's counters and the traffic monitor.

Any replica serves any account, so nothing a decision needs may live in one replica's memory alone. LiteLLM's
limiter shows what goes wrong otherwise: each replica admits `rpm` requests, so N replicas admit N x `rpm`.
- **Rate limits**: one Lua script per request reads and updates an account's sliding window (a sorted set of its
  requests, another of its token charges and their running sum) on the Redis server's clock. Redis runs a script
  alone, so requests reaching different replicas at the same instant are admitted one after the other and never
  both pass a limit only one may pass.
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
import uuid
from typing import Literal

import redis
from prometheus_client import Counter
from redis.backoff import NoBackoff
from redis.retry import Retry

from detectors.events import Event
from detectors.monitor import ALLOW, Action, Monitor
from guard.errors import APIError
from guard.store import Account, shown_url

logger = logging.getLogger(__name__)
LOG_EVERY = 10.0  # seconds between log lines about the same outage

# KEYS: the account's requests (sorted set: request id by time), its token charges (sorted set: "id:tokens" by
# time) and their sum. ARGV: window seconds, rpm, tpm (-1: none), this request's id. Returns strings (Redis turns
# Lua numbers into integers): admitted, requests in the window, tokens used, oldest request's time, oldest
# charge's time ("" when none), now.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - window)
local gone = 0
for _, charge in ipairs(expired) do gone = gone + tonumber(string.match(charge, ':(%d+)$')) end
if gone > 0 then redis.call('DECRBY', KEYS[3], gone) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
local first_request = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2] or ''
local first_charge = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2] or ''
local admitted = not ((rpm >= 0 and count >= rpm) or (tpm >= 0 and used >= tpm))
if admitted and rpm >= 0 then
    redis.call('ZADD', KEYS[1], now, ARGV[4])
    redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
end
return {admitted and '1' or '0', tostring(count), tostring(used), first_request, first_charge, tostring(now)}
"""

# KEYS as ADMIT's; ARGV: window seconds, the charge's id, tokens. The three keys expire together once idle.
CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[2], now, ARGV[2] .. ':' .. ARGV[3])
redis.call('INCRBY', KEYS[3], ARGV[3])
for i = 2, 3 do redis.call('PEXPIRE', KEYS[i], math.ceil(tonumber(ARGV[1]) * 1000)) end
"""


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


class RedisRateLimiter:
    """`guard.server.RateLimiter`'s limits, shared by every replica: an account's requests and tokens over the
    sliding `window` live in Redis and are read and updated by one script per request. Time is the Redis
    server's, so replicas whose clocks differ still count one window."""

    def __init__(self, shared: SharedState, window: float = 60.0):
        self.shared, self.window = shared, window
        self._admit = shared.redis.register_script(ADMIT)
        self._charge = shared.redis.register_script(CHARGE)
        self.counts_tokens: dict[str, bool] = {}  # by account, from its last admission: charging others is waste

    def keys(self, account: str) -> list[str]:
        # one hash tag per account: a Redis Cluster keeps an account's keys on one node, as a script needs
        return [f"{self.shared.prefix}:rate:{{{account}}}:{part}" for part in ("requests", "charges", "used")]

    def admit(self, account: Account, now: float | None = None) -> dict[str, str]:
        """The rate-limit headers for this request; a 429 with Retry-After when a limit is reached. (`now` is
        the caller's clock, which the shared window does not use.)"""
        self.counts_tokens[account.name] = account.tpm is not None
        if account.rpm is None and account.tpm is None:
            return {}
        try:
            admitted, count, used, first_request, first_charge, now = self._admit(
                keys=self.keys(account.name),
                args=[self.window, -1 if account.rpm is None else account.rpm,
                      -1 if account.tpm is None else account.tpm, uuid.uuid4().hex])
        except redis.RedisError as e:
            self.shared.failed("rate_limit", e)
            return {}
        count, used, now = int(count), int(used), float(now)
        reset_requests = float(first_request) + self.window - now if first_request else 0.0
        reset_tokens = float(first_charge) + self.window - now if first_charge else 0.0
        headers, waits = {}, []
        if account.rpm is not None:
            headers |= {"x-ratelimit-limit-requests": str(account.rpm),
                        "x-ratelimit-remaining-requests": str(max(0, account.rpm - count - 1)),
                        "x-ratelimit-reset-requests": f"{reset_requests:.3f}s"}
            if count >= account.rpm:
                waits.append(reset_requests)
        if account.tpm is not None:
            headers |= {"x-ratelimit-limit-tokens": str(account.tpm),
                        "x-ratelimit-remaining-tokens": str(max(0, account.tpm - used)),
                        "x-ratelimit-reset-tokens": f"{reset_tokens:.3f}s"}
            if used >= account.tpm:
                waits.append(reset_tokens)
        if admitted == "0":
            retry = max(1, math.ceil(max(waits, default=1.0)))
            raise APIError(429, f"Rate limit reached for account {account.name!r}; retry in {retry} s.",
                           "rate_limit_error", "rate_limit_exceeded", headers={**headers, "retry-after": str(retry)})
        return headers

    def charge(self, account: str, tokens: int, now: float | None = None) -> None:
        if not self.counts_tokens.get(account, True):
            return
        try:
            self._charge(keys=self.keys(account), args=[self.window, uuid.uuid4().hex, int(tokens)])
        except redis.RedisError as e:
            # the request is already served: a lost charge is counted and logged, never the client's error
            try:
                self.shared.failed("rate_limit", e)
            except APIError:
                pass


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
