"""Who is asking: the bearer key resolved to its account (`resolve_account`, through the store's hashed keys and
a short-lived `KeyCache`, or the gateway's own key list), and the `Caller` every defence acts for
(`require_caller`): the account, or the end user a trusted proxy names within it, its address and, in a lab,
its simulated time."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import AsyncIterator

from cachetools import TTLCache
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from guard.gateway.errors import APIError
from guard.gateway.limits import release
from guard.gateway.store import Account
from guard.teacher import LAB_TIME_HEADER, Caller


class KeyCache:
    """The accounts of keys the store resolved in the last `ttl` seconds, by the key's SHA-256 (no key is kept),
    so that most requests skip the store's lookup. So a key revoked in the store (`distill-guard keys revoke`,
    from any process) is refused within `ttl` seconds, and a changed limit or policy applies within `ttl` too;
    one revoked through this gateway's admin API is forgotten at once (`forget`). Unknown keys are never cached:
    a new key works at once, and random keys cannot fill the cache. At most `size` keys are held, the least
    recently used dropped first. Request threads and the admin API share it, hence the lock."""

    def __init__(self, ttl: float, size: int = 10_000):
        self.ttl = ttl
        self.accounts: TTLCache[bytes, Account] = TTLCache(size, max(ttl, 1e-9))
        self.forgotten: TTLCache[str, float] = TTLCache(size, max(ttl, 1e-9))  # key id -> when it was revoked
        self.lock = threading.Lock()

    def get(self, key: str) -> Account | None:
        with self.lock:
            return self.accounts.get(_digest(key))

    def put(self, key: str, account: Account, asked: float) -> None:
        """Cache the store's answer to a lookup made at `asked` (monotonic time), unless the key was revoked here
        since: the answer is older than the revocation."""
        with self.lock:
            if self.ttl > 0 and self.forgotten.get(account.key_id, -math.inf) < asked:
                self.accounts[_digest(key)] = account

    def forget(self, key_id: str) -> None:
        """Drop the key with this id (revoked here, through the admin API), and any lookup of it in flight."""
        with self.lock:
            self.forgotten[key_id] = time.monotonic()
            for digest in [digest for digest, account in self.accounts.items() if account.key_id == key_id]:
                del self.accounts[digest]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def resolve_account(request: Request) -> Account | None:
    """The account behind the request's bearer key: through the store's hashed keys (cached for a few seconds:
    `KeyCache`), or the server's own key list compared in constant time (accounts key-0, key-1, ...); None when
    the server takes no keys. Async, so that a cached key costs no trip to the thread pool."""
    state = request.app.state
    if state.store is None and not state.api_keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    account = None
    if scheme.lower() == "bearer" and token:
        if state.store is not None:
            account = state.keys.get(token)
            if account is None:
                asked = time.monotonic()
                account = await run_in_threadpool(state.store.resolve, token)  # a database read may wait on disk
                if account is not None:
                    state.keys.put(token, account, asked)
        else:
            names = [f"key-{i}" for i, key in enumerate(state.api_keys)
                     if hmac.compare_digest(key.encode(), token.encode())]
            account = Account(names[0], key_id=names[0]) if names else None
    if account is None:
        raise APIError(401, "Incorrect or missing API key.", "invalid_request_error", "invalid_api_key")
    return account


async def require_caller(request: Request,
                         account: Account | None = Depends(resolve_account)) -> AsyncIterator[Caller]:
    """The caller every defence acts for: the key's account and the client's address (anonymous without keys).
    A lab gateway (`lab_clock`) takes the caller's time from the `LAB_TIME_HEADER`, so that an experiment's
    simulated clock reaches the monitor; any other ignores it. A route admits the request under the account's
    rate limits once it knows its prompts and `max_tokens` (`guard.gateway.limits.admit`); once the request is over,
    what it reserved and did not spend is refunded. (Async, and it never blocks: no Redis call on the event
    loop.)"""
    ip = request.client.host if request.client else None
    when = _lab_time(request) if request.app.state.lab_clock else None
    request.state.account = account
    try:
        yield Caller(account=_served_party(request, account), ip=ip, time=when)
    finally:
        await release(request)


def _served_party(request: Request, account: Account | None) -> str | None:
    """Whom defences judge: the key's account, and within it the end user that a trusted upstream gateway
    (LiteLLM, Kong, Envoy: one key for many users) names in `end_user_header` ("account/user"). The header is
    taken only from a trusted proxy's address; from anyone else it is ignored, as are forwarding headers."""
    header = request.app.state.end_user_header
    user = request.headers.get(header) if header and request.scope["state"].get("via_trusted_proxy") else None
    if not user:
        return account.name if account else None
    if len(user) > MAX_END_USER or not user.isprintable():
        raise APIError(400, f"{header}: an end user is at most {MAX_END_USER} printable characters")
    return f"{account.name}/{user}" if account else user


MAX_END_USER = 256


def _lab_time(request: Request) -> float | None:
    sent = request.headers.get(LAB_TIME_HEADER)
    if sent is None:
        return None
    try:
        when = float(sent)
    except ValueError:
        when = math.nan
    if not math.isfinite(when):
        raise APIError(400, f"{LAB_TIME_HEADER}: {sent!r} is not a time in seconds since the epoch")
    return when
