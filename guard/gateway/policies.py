"""Tiers: the redaction policy each account is served under. A tier is a set of keys sharing a policy and
limits; the limits are `guard.gateway.limits`', the policies built here, once per spec."""

from __future__ import annotations

import logging
import threading

from fastapi import Depends, Request

from guard.gateway.auth import resolve_account
from guard.gateway.errors import APIError
from guard.gateway.store import Account
from guard.redaction import Policy, Sealer, Summarize, parse_policy

logger = logging.getLogger(__name__)


class Policies:
    """The redaction policy of each spec accounts name, built once per distinct spec and shared by every key
    that names it. That is all a tier needs: a tier is a set of keys sharing a policy and limits. No spec
    (None) is the gateway's own policy. `sealed` needs the gateway's sealer: without one it is refused, as is
    an unknown spec (ValueError), never sealed under a key that dies with the process."""

    def __init__(self, default: Policy, sealer: Sealer | None, summarize: Summarize | None):
        self.default, self.sealer, self.summarize = default, sealer, summarize
        self.built: dict[str, Policy] = {}
        self.lock = threading.Lock()

    def __call__(self, spec: str | None) -> Policy:
        if spec is None:
            return self.default
        with self.lock:
            if spec not in self.built:
                if spec == "sealed" and self.sealer is None:
                    raise ValueError("the sealed policy needs the gateway's sealing key ($DISTILL_GUARD_SEAL_KEY), "
                                     "and this gateway has none")
                self.built[spec] = parse_policy(spec, self.summarize, self.sealer, self.default.marked)
            return self.built[spec]


def account_policy(request: Request, account: Account | None = Depends(resolve_account)) -> Policy:
    """The redaction policy the request is served under: its account's when its key names one, else the
    gateway's. An account whose policy this gateway cannot serve is refused, with the reason logged."""
    try:
        return request.app.state.policies(account.policy if account else None)
    except ValueError as e:
        logger.error("account %r cannot be served: %s", account.name, e)
        raise APIError(403, "This key's redaction policy cannot be served by this gateway; ask its provider.",
                       "permission_error", "policy_unavailable") from None
