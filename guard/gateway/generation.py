"""Generation for one request: its prompts through the batcher (or straight to a backend that serves concurrent
calls itself), cut at the client's stop sequences, then redacted whole under the account's policy."""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import wait

import anyio
from fastapi import Request

from guard.gateway.batcher import Overloaded
from guard.gateway.errors import APIError
from guard.redaction import Policy, redact_completions
from guard.teacher import Caller, Completion, Sampling

logger = logging.getLogger(__name__)


def complete(request: Request, prompt: str, sampling: Sampling, caller: Caller, stops: list[str]) -> Completion:
    """The completion for `caller` as the teacher (with its inner defences) wrote it, before the account's
    redaction policy, ending before the first of `stops`."""
    return complete_all(request, [prompt], sampling, caller, stops)[0]


def complete_all(request: Request, prompts: list[str], sampling: Sampling, caller: Caller,
                  stops: list[str]) -> list[Completion]:
    """`complete` for each of one request's prompts."""
    return [stopped(completion, stops) for completion in generated(request, prompts, sampling, caller)]


def stopped(completion: Completion, stops: list[str]) -> Completion:
    """The completion ending before the first of `stops`, finish_reason "stop", as OpenAI's `stop` serves it. The
    tokens generated past it are still billed: they were generated."""
    cut = min((at for stop in stops if (at := completion.text.find(stop)) >= 0), default=None)
    if cut is None:
        return completion
    return dataclasses.replace(completion, text=completion.text[:cut], finish_reason="stop")


def generated(request: Request, prompts: list[str], sampling: Sampling, caller: Caller) -> list[Completion]:
    """Each of one request's prompts completed, queued together so that they can share a batch. A backend that
    serves concurrent calls itself (an upstream server) is called at once, from this request's thread: batching
    would only make its requests wait for each other."""
    state = request.app.state
    if state.teacher.concurrent:
        return state.teacher.complete(prompts, sampling, [caller] * len(prompts))
    try:
        answers = state.batcher.submit(state.teacher, prompts, sampling, caller)
    except Overloaded as e:
        logger.warning("turned a request away: %s", e)
        raise APIError(503, "The model is overloaded; retry shortly.", "server_error", "overloaded",
                       headers={"retry-after": "1"}) from None
    while len(wait(answers, timeout=DISCONNECT_POLL).done) < len(answers):
        if anyio.from_thread.run(request.is_disconnected):  # nobody to answer: its prompts leave the queue
            for answer in answers:
                answer.cancel()
            raise APIError(499, "The client closed the request.", code="client_closed_request")
    return [answer.result() for answer in answers]


DISCONNECT_POLL = 0.25  # seconds between checks that a client waiting in the batcher's queue is still there


def served(policy: Policy, prompt: str, completion: Completion) -> Completion:
    """The completion as `policy` serves it whole, the policy named in its audit row."""
    [served] = redact_completions(policy, [prompt], [completion])
    served.decisions["redaction"] = policy.name
    return served
