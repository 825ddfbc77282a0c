"""Rate limits per account: requests and tokens per minute, counted in this process (`RateLimiter`, one gateway)
or in Redis (`RedisRateLimiter`, shared by a gateway's replicas). Both decide and answer alike (`admission`).

In Redis, one Lua script per request reads and updates an account's sliding window (a sorted set of its requests,
another of its token charges and their running sum) on the Redis server's clock. Redis runs a script alone, so
requests reaching different replicas at the same instant are admitted one after the other and never both pass
a limit only one may pass. LiteLLM's limiter shows what goes wrong otherwise: each replica admits `rpm`
requests, so N replicas admit N x `rpm`.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections import defaultdict, deque

import redis

from guard.errors import APIError
from guard.shared_state import SharedState
from guard.store import Account


def admission(account: Account, requests: int, tokens: int, reset_requests: float, reset_tokens: float) -> dict[str, str]:
    """The rate-limit headers for a request of `account`, which sent `requests` requests and used `tokens` tokens
    in the window (the oldest of each leaving it in `reset_*` seconds); raises a 429 with Retry-After when a
    limit is reached."""
    headers, waits = {}, []
    if account.rpm is not None:
        headers |= {"x-ratelimit-limit-requests": str(account.rpm),
                    "x-ratelimit-remaining-requests": str(max(0, account.rpm - requests - 1)),
                    "x-ratelimit-reset-requests": f"{reset_requests:.3f}s"}
        if requests >= account.rpm:
            waits.append(reset_requests)
    if account.tpm is not None:
        headers |= {"x-ratelimit-limit-tokens": str(account.tpm),
                    "x-ratelimit-remaining-tokens": str(max(0, account.tpm - tokens)),
                    "x-ratelimit-reset-tokens": f"{reset_tokens:.3f}s"}
        if tokens >= account.tpm:
            waits.append(reset_tokens)
    if waits:
        retry = max(1, math.ceil(max(waits)))
        raise APIError(429, f"Rate limit reached for account {account.name!r}; retry in {retry} s.",
                       "rate_limit_error", "rate_limit_exceeded", headers={**headers, "retry-after": str(retry)})
    return headers


class RateLimiter:
    """Requests and tokens per account over a sliding window (a minute by default), in this process's memory.

    A request is admitted while its account sent fewer than `rpm` requests and used fewer than `tpm` tokens in
    the window; tokens are charged when a completion is done (a stream's too). Memory per account is bounded
    by its requests in one window, and each request costs O(1). Replicas share their counters through Redis
    instead (`RedisRateLimiter`).
    """

    def __init__(self, window: float = 60.0):
        self.window = window
        self.requests: dict[str, deque[float]] = defaultdict(deque)
        self.tokens: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.used: dict[str, int] = defaultdict(int)  # the sum of `tokens`, kept so a request costs O(1)
        self.lock = threading.Lock()

    def _trim(self, account: str, now: float) -> None:
        requests, tokens = self.requests[account], self.tokens[account]
        while requests and requests[0] <= now - self.window:
            requests.popleft()
        while tokens and tokens[0][0] <= now - self.window:
            self.used[account] -= tokens.popleft()[1]

    def admit(self, account: Account, now: float) -> dict[str, str]:
        """The rate-limit headers for this request; raises a 429 with Retry-After when a limit is reached."""
        with self.lock:
            self._trim(account.name, now)
            requests, tokens = self.requests[account.name], self.tokens[account.name]
            headers = admission(account, len(requests), self.used[account.name],
                                requests[0] + self.window - now if requests else 0.0,
                                tokens[0][0] + self.window - now if tokens else 0.0)
            if account.rpm is not None:
                requests.append(now)
            return headers

    def charge(self, account: str, tokens: int, now: float) -> None:
        with self.lock:
            self.tokens[account].append((now, tokens))
            self.used[account] += tokens


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


class RedisRateLimiter:
    """`RateLimiter`'s limits, shared by every replica: an account's requests and tokens over the
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
        now = float(now)
        return admission(account, int(count), int(used),
                         float(first_request) + self.window - now if first_request else 0.0,
                         float(first_charge) + self.window - now if first_charge else 0.0)

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
