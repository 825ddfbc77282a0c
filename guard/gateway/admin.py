"""The gateway's admin API under `/admin`, behind one admin key: create, list and revoke API keys; read the
audit log a page at a time; purge it by age. And retention: the audit log's old rows purged by setting.

The admin key is held only as its SHA-256 digest and compared in constant time. It is not an API key: a
client key on `/admin` is refused (401), and the admin key on `/v1` is refused too, because the store does
not know it. A gateway started without an admin key has no admin API (404 on every `/admin` route), never
an open one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from contextlib import asynccontextmanager, suppress

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from guard.gateway.errors import APIError
from guard.gateway.store import MAX_LIMIT, AuditRecord, Store

logger = logging.getLogger(__name__)
ADMIN_KEY_ENV = "DISTILL_GUARD_ADMIN_KEY"
MIN_ADMIN_KEY_CHARS = 32
DAY = 86_400.0
PURGE_EVERY = 3_600.0  # seconds between retention purges, at most


def admin_digest(key: str) -> bytes:
    """What the gateway keeps of its admin key. A short key is refused: it guards every account's keys."""
    key = key.strip()
    if len(key) < MIN_ADMIN_KEY_CHARS:
        raise ValueError(f"the admin key is {len(key)} characters; use at least {MIN_ADMIN_KEY_CHARS} random ones "
                         "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return hashlib.sha256(key.encode()).digest()


def require_admin(request: Request) -> Store:
    """The gateway's store, for a request that carries the admin key."""
    state = request.app.state
    if state.admin_digest is None:
        raise APIError(404, "The admin API is not enabled on this gateway.", code="admin_disabled")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    offered = hashlib.sha256(token.encode()).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(offered, state.admin_digest):
        raise APIError(401, "Incorrect or missing admin key.", code="invalid_admin_key")
    return state.store


router = APIRouter(prefix="/admin")


class NewKey(BaseModel):
    account: str = Field(min_length=1)
    rpm: int | None = Field(None, ge=1, le=MAX_LIMIT)
    tpm: int | None = Field(None, ge=1, le=MAX_LIMIT)
    policy: str | None = Field(None, description="redaction policy spec; none: the gateway's")


class KeyOut(BaseModel):
    """A key as the admin sees it: never the key itself nor its hash."""

    id: str
    account: str
    rpm: int | None
    tpm: int | None
    policy: str | None
    revoked: bool


class CreatedKey(KeyOut):
    key: str  # shown this once; only its hash is stored


class AuditPage(BaseModel):
    data: list[AuditRecord]
    next_seq: int = Field(description="pass as `after_seq` for the next page: the last row's `seq` (the one asked "
                                      "for on an empty page, where rows committed later will appear)")


class Purge(BaseModel):
    older_than_days: float = Field(gt=0, le=1e6)


def _key_out(account) -> dict:
    return {"id": account.key_id, "account": account.name, "rpm": account.rpm, "tpm": account.tpm,
            "policy": account.policy, "revoked": account.revoked}


@router.post("/keys", response_model=CreatedKey, status_code=201)
def create_key(body: NewKey, request: Request, store: Store = Depends(require_admin)):
    if body.policy is not None:
        try:
            request.app.state.policies(body.policy)  # one this gateway cannot serve is refused now
        except ValueError as e:
            raise APIError(400, f"policy: {e}") from None
    try:
        key = store.create_key(body.account, rpm=body.rpm, tpm=body.tpm, policy=body.policy)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return {**_key_out(store.resolve(key)), "key": key}


@router.get("/keys", response_model=list[KeyOut])
def list_keys(store: Store = Depends(require_admin)):
    return [_key_out(account) for account in store.list_keys()]


@router.delete("/keys/{key_id}", response_model=KeyOut)
def revoke_key(key_id: str, request: Request, store: Store = Depends(require_admin)):
    if not store.revoke(key_id):
        raise APIError(404, f"No live key has the id {key_id!r}.", code="key_not_found")
    request.app.state.keys.forget(key_id)  # refused by this gateway at once, not when its cached lookup expires
    return next(_key_out(a) for a in store.list_keys() if a.key_id == key_id)


@router.get("/audit", response_model=AuditPage)
def read_audit(after_seq: int = Query(0, ge=0, le=MAX_LIMIT,  # a database integer: larger is a 400, not a 500
                                     description="rows committed after the row of this `seq`"),
               since: float | None = Query(None, allow_inf_nan=False,
                                           description="seconds since the epoch; only rows at or after it"),
               limit: int = Query(100, ge=1, le=1000), store: Store = Depends(require_admin)):
    """The log in commit order, a page at a time. Paged by `seq`, not by time: many rows share a time (a
    request's prompts), and a row's time is its request's start, so rows commit out of time order."""
    rows = store.page(after_seq, limit, since)
    return {"data": rows, "next_seq": rows[-1].seq if rows else after_seq}


@router.post("/audit/purge")
def purge_audit(body: Purge, store: Store = Depends(require_admin)):
    return {"deleted": store.purge(body.older_than_days * DAY)}


@asynccontextmanager
async def retention_kept(store: Store | None, seconds: float | None):
    """Audit rows older than `seconds` purged now, before anything is served, then every `PURGE_EVERY` (or
    `seconds`, if sooner) until the block exits. No retention (None) keeps every row."""
    if seconds is None:
        yield
        return
    logger.info("retention: purged %d audit rows at start-up", store.purge(seconds))

    async def purge_forever():
        while True:
            await asyncio.sleep(min(seconds, PURGE_EVERY))
            try:
                removed = await asyncio.to_thread(store.purge, seconds)
            except Exception:  # a busy or failing database must not end retention for good
                logger.exception("retention: purge failed; trying again later")
            else:
                logger.info("retention: purged %d audit rows", removed)

    task = asyncio.create_task(purge_forever())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
