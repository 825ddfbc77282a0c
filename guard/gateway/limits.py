"""Rate limits per account: requests and tokens per minute, counted in this process (`RateLimiter`, one gateway)
or in Redis (`RedisRateLimiter`, shared by a gateway's replicas). Both decide and answer alike (`admission`).

Tokens are reserved, not merely checked. A request is admitted only if its worst case fits what is left of the
account's window: for each of its prompts, the prompt's tokens plus `max_tokens`. Each prompt is one request
against rpm (a completions batch of 64 prompts is 64 requests). Once a prompt's audit row is written, its
reservation is settled to what it spent, and a request that ends without a row (refused, failed, the store
down) has the rest refunded (`release`). So concurrent requests never all see the same room left, and the
tokens an account spends in a window stay within its limit. LiteLLM's limiters, which check and charge
afterwards, let N concurrent requests through where one fits.

In this process the window is kept on the monotonic clock: a wall clock stepped by NTP or an operator neither
frees an account nor locks it out. In Redis, one Lua script per request reads and updates an account's sliding
window (a sorted set of its requests, another of its token charges and their running sum) on the Redis
server's clock. Redis runs a script alone, so requests reaching different replicas at the same instant are
admitted one after the other and never both pass a limit only one may pass: each replica admitting its own
`rpm` would admit N x `rpm` over N replicas. The scripts are loaded when the limiter is made, so one Redis
cannot run stops the gateway at start-up rather than failing open on every request.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastapi.concurrency import run_in_threadpool

from guard.gateway.errors import APIError
from guard.gateway.shared_state import SharedState, Unreachable
from guard.gateway.store import Account


@dataclass
class Reservation:
    """What an admitted request holds: its rate-limit headers, and each prompt's token reservation still to
    settle (in the order the prompts' audit rows are written; empty for an account without a token limit)."""

    headers: dict[str, str] = field(default_factory=dict)
    pending: deque = field(default_factory=deque)


def admission(account: Account, requests: int, tokens: int, reset_requests: float, reset_tokens: float,
              asked_requests: int = 1, asked_tokens: int = 0) -> dict[str, str]:
    """The rate-limit headers for a request of `account` asking for `asked_requests` requests (its prompts) and
    `asked_tokens` tokens (their worst case), when the window holds `requests` requests and `tokens` tokens (the
    oldest of each leaving it in `reset_*` seconds); raises a 429 when it does not fit, with Retry-After when
    waiting can make it fit."""
    headers, waits, too_large = {}, [], []
    if account.rpm is not None:
        headers |= {"x-ratelimit-limit-requests": str(account.rpm),
                    "x-ratelimit-remaining-requests": str(max(0, account.rpm - requests - asked_requests)),
                    "x-ratelimit-reset-requests": f"{reset_requests:.3f}s"}
        if asked_requests > account.rpm:
            too_large.append(f"{asked_requests} prompts, over its limit of {account.rpm} requests per minute")
        elif requests + asked_requests > account.rpm:
            waits.append(reset_requests)
    if account.tpm is not None:
        headers |= {"x-ratelimit-limit-tokens": str(account.tpm),
                    "x-ratelimit-remaining-tokens": str(max(0, account.tpm - tokens - asked_tokens)),
                    "x-ratelimit-reset-tokens": f"{reset_tokens:.3f}s"}
        if asked_tokens > account.tpm:
            too_large.append(f"up to {asked_tokens} tokens (prompts plus max_tokens for each), over its limit of "
                             f"{account.tpm} tokens per minute")
        elif tokens + asked_tokens > account.tpm:
            waits.append(reset_tokens)
    if too_large:  # waiting cannot help: no Retry-After
        raise APIError(429, f"Request too large for account {account.name!r}: " + "; ".join(too_large) + ".",
                       "rate_limit_error", "rate_limit_exceeded", headers=headers)
    if waits:
        retry = max(1, math.ceil(max(waits)))
        raise APIError(429, f"Rate limit reached for account {account.name!r}; retry in {retry} s.",
                       "rate_limit_error", "rate_limit_exceeded", headers={**headers, "retry-after": str(retry)})
    return headers


class RateLimiter:
    """Requests and tokens per account over a sliding window (a minute by default), in this process's memory,
    on the monotonic clock (`now` is for tests).

    Memory per account is bounded by its requests in one window, and each prompt costs O(1). Replicas share
    their counters through Redis instead (`RedisRateLimiter`).
    """

    def __init__(self, window: float = 60.0):
        self.window = window
        self.requests: dict[str, deque[float]] = defaultdict(deque)
        self.tokens: dict[str, deque[list]] = defaultdict(deque)  # [time, tokens]; tokens None once expired
        self.used: dict[str, int] = defaultdict(int)  # the sum of `tokens`, kept so a request costs O(1)
        self.lock = threading.Lock()

    def _trim(self, account: str, now: float) -> None:
        requests, tokens = self.requests[account], self.tokens[account]
        while requests and requests[0] <= now - self.window:
            requests.popleft()
        while tokens and tokens[0][0] <= now - self.window:
            charge = tokens.popleft()
            self.used[account] -= charge[1]
            charge[1] = None  # its reservation, if still open, has nothing left to settle

    def admit(self, account: Account, reserve: Sequence[int] = (0,), now: float | None = None) -> Reservation:
        """Admits one request per item of `reserve`, each reserving that many tokens; a 429 when they do not fit."""
        now = time.monotonic() if now is None else now
        with self.lock:
            self._trim(account.name, now)
            requests, tokens = self.requests[account.name], self.tokens[account.name]
            headers = admission(account, len(requests), self.used[account.name],
                                requests[0] + self.window - now if requests else 0.0,
                                tokens[0][0] + self.window - now if tokens else 0.0, len(reserve), sum(reserve))
            reservation = Reservation(headers)
            if account.rpm is not None:
                requests.extend([now] * len(reserve))
            if account.tpm is not None:
                for n in reserve:
                    tokens.append(charge := [now, n])
                    reservation.pending.append((account.name, charge))
                self.used[account.name] += sum(reserve)
            return reservation

    def settle(self, reservation: Reservation, spent: int) -> None:
        """The next prompt of `reservation` spent `spent` tokens: its charge becomes that."""
        if not reservation.pending:
            return
        account, charge = reservation.pending.popleft()
        with self.lock:
            if charge[1] is not None:
                self.used[account] += spent - charge[1]
                charge[1] = spent

    def release(self, reservation: Reservation) -> None:
        """Refunds every prompt of `reservation` not settled: the request ended without serving them."""
        while reservation.pending:
            self.settle(reservation, 0)


# KEYS: the account's requests (sorted set: request ids by time), its token charges (sorted set: "id:tokens" by
# time) and their sum. ARGV: window seconds, rpm, tpm (-1: none), this request's id, then each prompt's tokens to
# reserve. Returns strings (Redis turns Lua numbers into integers): admitted, requests in the window, tokens
# used, oldest request's time, oldest charge's time ("" when none), now.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local prompts, asked = #ARGV - 4, 0
for i = 5, #ARGV do asked = asked + tonumber(ARGV[i]) end
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
local admitted = not ((rpm >= 0 and count + prompts > rpm) or (tpm >= 0 and used + asked > tpm))
local ttl = math.ceil(window * 1000)
if admitted and rpm >= 0 then
    for i = 1, prompts do redis.call('ZADD', KEYS[1], now, ARGV[4] .. '-' .. i) end
    redis.call('PEXPIRE', KEYS[1], ttl)
end
if admitted and tpm >= 0 then
    for i = 1, prompts do redis.call('ZADD', KEYS[2], now, ARGV[4] .. '-' .. i .. ':' .. ARGV[4 + i]) end
    redis.call('INCRBY', KEYS[3], asked)
    for i = 2, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
end
return {admitted and '1' or '0', tostring(count), tostring(used), first_request, first_charge, tostring(now)}
"""

# KEYS: the account's token charges and their sum. ARGV: the charge as reserved, as spent, and the two counts.
# A charge already out of the window has nothing to settle.
SETTLE = """
local at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not at then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], at, ARGV[2])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[4]) - tonumber(ARGV[3]))
return 1
"""


class RedisRateLimiter:
    """`RateLimiter`'s limits, shared by every replica: an account's requests and tokens over the
    sliding `window` live in Redis and are read and updated by one script per request. Time is the Redis
    server's, so replicas whose clocks differ still count one window."""

    def __init__(self, shared: SharedState, window: float = 60.0):
        self.shared, self.window = shared, window
        self._admit = shared.redis.register_script(ADMIT)
        self._settle = shared.redis.register_script(SETTLE)
        for script in (ADMIT, SETTLE):  # a script Redis cannot run fails here, loudly, not in every request
            shared.redis.script_load(script)

    def keys(self, account: str) -> list[str]:
        # one hash tag per account: a Redis Cluster keeps an account's keys on one node, as a script needs
        return [f"{self.shared.prefix}:rate:{{{account}}}:{part}" for part in ("requests", "charges", "used")]

    def admit(self, account: Account, reserve: Sequence[int] = (0,), now: float | None = None) -> Reservation:
        """`RateLimiter.admit`, in Redis. (`now` is the caller's clock, which the shared window does not use.)
        When Redis is down: unlimited (fail-open) or a 503 (fail-closed)."""
        if account.rpm is None and account.tpm is None:
            return Reservation()
        request = uuid.uuid4().hex
        try:
            admitted, count, used, first_request, first_charge, now = self.shared.call(
                "rate_limit", self._admit, keys=self.keys(account.name),
                args=[self.window, -1 if account.rpm is None else account.rpm,
                      -1 if account.tpm is None else account.tpm, request, *map(int, reserve)])
        except Unreachable:
            return Reservation()
        now = float(now)
        headers = admission(account, int(count), int(used),
                            float(first_request) + self.window - now if first_request else 0.0,
                            float(first_charge) + self.window - now if first_charge else 0.0,
                            len(reserve), sum(reserve))
        pending = deque((account.name, f"{request}-{i}", int(n)) for i, n in enumerate(reserve, 1))
        return Reservation(headers, pending if account.tpm is not None else deque())

    def settle(self, reservation: Reservation, spent: int) -> None:
        if not reservation.pending:
            return
        account, charge, reserved = reservation.pending.popleft()
        if spent == reserved:
            return
        keys = self.keys(account)
        try:
            self.shared.call("rate_limit", self._settle, keys=keys[1:],
                             args=[f"{charge}:{reserved}", f"{charge}:{spent}", reserved, spent])
        except (Unreachable, APIError):
            pass  # the request is served: a lost settlement is counted and logged, never the client's error

    def release(self, reservation: Reservation) -> None:
        while reservation.pending:
            self.settle(reservation, 0)


def admit(request, counts: Sequence[int], max_tokens: int) -> dict[str, str]:
    """Admits a gateway request of prompts of `counts` tokens, each allowed `max_tokens` more, under the limits
    of its caller's account (`request.state.account`, set by the auth dependency; none without keys); the
    rate-limit headers. The reservation waits in `request.state` for the request's audit rows (`settle`)."""
    account = getattr(request.state, "account", None)
    if account is None:
        return {}
    request.state.reservation = request.app.state.limiter.admit(account, [n + max_tokens for n in counts])
    return request.state.reservation.headers


def settle(request, spent: int) -> None:
    """The request's next prompt, its audit row written, spent `spent` tokens."""
    reservation = getattr(request.state, "reservation", None)
    if reservation is not None:
        request.app.state.limiter.settle(reservation, spent)


async def release(request) -> None:
    """Refunds what the request reserved and did not settle, once it is over (in the thread pool: it may call
    Redis, which must never block the event loop)."""
    reservation = getattr(request.state, "reservation", None)
    if reservation is not None and reservation.pending:
        await run_in_threadpool(request.app.state.limiter.release, reservation)
