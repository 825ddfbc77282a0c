"""Every request's audit row and its charge: the row is durable before any of the response is sent, and only
then is the account charged its tokens (its reservation settled: `guard.gateway.limits`)."""

from __future__ import annotations

import time

from fastapi import Request

from guard.gateway.limits import settle
from guard.gateway.store import AuditRecord
from guard.teacher import Caller, Completion


def audit(request: Request, caller: Caller, endpoint: str, prompt: str, completion: Completion, n_prompt: int,
           started: float, response: str | None = None, *, request_id: str) -> None:
    """Write one durable audit row for the request, before any of the response is sent, then charge the account
    its tokens (settling the prompt's reservation): a request whose row cannot be written is not served, and
    costs its account nothing. `response`: the text the client gets, when it is not `completion.text` (a stream
    redacted as it goes out). `request_id` is the id the client receives (see `row_id`), so a client can find
    its request in the log."""
    state, status = request.app.state, TURNED_AWAY.get(completion.finish_reason, 200)
    if state.store is not None:
        decisions = {**completion.decisions, **({"served": completion.finish_reason} if status != 200 else {})}
        state.store.log(AuditRecord(request_id=request_id, account=caller.account,
                                    time=started if caller.time is None else caller.time,
                                    prompt=prompt, response=completion.text if response is None else response,
                                    prompt_tokens=n_prompt,
                                    completion_tokens=completion.completion_tokens, decisions=decisions,
                                    latency=time.time() - started, status=status, ip=caller.ip, endpoint=endpoint))
    if status == 400:  # a prompt turned away for its length was never read by the model: nothing to charge
        settle(request, 0)
        return
    state.metrics.tokens.labels(kind="prompt").inc(n_prompt)
    state.metrics.tokens.labels(kind="completion").inc(completion.completion_tokens)
    settle(request, n_prompt + completion.completion_tokens)


TURNED_AWAY = {"refused": 403, "context_length": 400}  # the status of a request answered without generation


def row_id(response_id: str, index: int, prompts: int) -> str:
    """The audit row's request id for prompt `index` of a request with `prompts` prompts: the response's `id`
    (also its `x-request-id` header) for one prompt, `{id}-{index}` for each of several (a completions batch)."""
    return response_id if prompts == 1 else f"{response_id}-{index}"


def billed_prompt(counted: int, completion: Completion) -> int:
    """The prompt's tokens to bill: the gateway's own count, or the backend's where the gateway cannot count
    (a remote backend's tokenizer is not known here)."""
    return completion.prompt_tokens if not counted and completion.prompt_tokens is not None else counted
