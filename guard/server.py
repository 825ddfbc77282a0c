"""An OpenAI-compatible server for any Teacher: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

It is the seed of the gateway: routes are thin, auth is a dependency, and the teacher (defences and
all) is created once in the lifespan. `stream=True` answers in OpenAI's server-sent-event chunks. Generation
is not token-streamed: a completion is generated whole, then sent out through the `StreamRedactor` of the
caller's redaction policy (its key's, else the gateway's), so a policy that may withhold reasoning sends
nothing until the end and never takes back what it sent. The admin API (`/admin`) is `guard.admin`'s.

Bounds answer in OpenAI's error shape, never as a 500 with a traceback: a body over `max_body_bytes` is 413
before it is parsed; prompt plus `max_tokens` beyond the model's context, more than `max_prompts` prompts,
and malformed JSON are 400; a store that cannot be reached is a 503 (nothing is served without its audit row);
anything unexpected is a 500 with a generic message, logged here in full.

In front of an upstream (an `OpenAITeacher`: vLLM, a vendor API) the gateway is a proxy: an upstream that times
out is a 504, one that fails or answers garbage a 502 (its credentials refused too: the provider's to fix), and
an upstream 4xx that is the request's own fault reaches the client as that 4xx with the upstream's message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import wait
from contextlib import asynccontextmanager, contextmanager
from typing import Literal

import anyio
import uvicorn
from cachetools import TTLCache
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from guard.admin import admin_digest, require_admin, retention_kept
from guard.admin import router as admin_router
from guard.batcher import Batcher, Overloaded
from guard.errors import APIError
from guard.openai_teacher import TeacherAuthError, TeacherHTTPError, TeacherRequestError, TeacherTimeout
from guard.limits import RateLimiter, RedisRateLimiter, admit, release, settle
from guard.prompts import Conversation, prompt_ids
from guard.reasoning import restore_reasoning
from guard.redaction import (Full, Policy, Sealer, SealError, StreamRedactor, Summarize, parse_policy,
                             redact_completions)
from guard.shared_state import SharedState
from guard.store import UNAVAILABLE, Account, AuditRecord, Store
from guard.teacher import LAB_TIME_HEADER, Caller, Completion, Sampling, Teacher

logger = logging.getLogger(__name__)
MiB = 1 << 20
GREEDY_BELOW = 1e-5  # temperature


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str
    sealed_reasoning: str | None = None  # handed back from an earlier assistant turn; checked, never trusted


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints take. Any other is a 400 naming it, never silently ignored: a client that asks
    for a penalty or a bias this server does not apply learns so. `user` alone is taken and ignored (the end user
    a defence judges comes from the key, or from a trusted proxy's header: `create_app`'s `end_user_header`)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension (as in vLLM): sample from the k most likely tokens")
    max_tokens: int | None = Field(None, ge=1, le=4096)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63, description="a 64-bit integer")
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")
    stop: str | list[str] | None = Field(None, description="up to 4 sequences; the text ends before the first")
    user: str | None = Field(None, max_length=256, description="taken and ignored")

    @property
    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if len(stops) > 4 or not all(stops):
            raise APIError(400, "stop: at most 4 sequences, none empty")
        if stops and getattr(self, "logprobs", None):
            raise APIError(400, "stop: not served with logprobs; ask for one or the other")
        return stops

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, logprobs: int) -> Sampling:
        # as in vLLM, a temperature this close to 0 is greedy: dividing the logits by it would overflow
        temperature = self.temperature if self.temperature >= GREEDY_BELOW else 0.0
        return Sampling(temperature=temperature, top_p=self.top_p, top_k=self.top_k,
                        max_new_tokens=self.max_tokens or 64, seed=self.seed, logprobs=logprobs)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    sealed_reasoning: str | None = None  # the withheld reasoning, encrypted; only this server's key opens it


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    sealed_reasoning: str | None = None
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    sealed_reasoning: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    sealed_reasoning: str | None = None
    finish_reason: str | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


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
    rate limits once it knows its prompts and `max_tokens` (`guard.limits.admit`); once the request is over,
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


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("distill_guard_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("distill_guard_request_seconds", "HTTP request latency by path", ["path"],
                                 registry=self.registry)
        self.tokens = Counter("distill_guard_tokens", "tokens served (completion tokens include hidden ones)",
                              ["kind"], registry=self.registry)


KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/metrics")


def _refusal(request_id: str) -> APIError:
    return APIError(403, "The provider's traffic policy refused this request.", "permission_error", "refused",
                    headers={"x-request-id": request_id})


def _audit(request: Request, caller: Caller, endpoint: str, prompt: str, completion: Completion, n_prompt: int,
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


def refused(completion: Completion) -> bool:
    """A defence refused to serve it (the monitor's block or throttle). The client is told no more than that:
    the reason is for the provider's audit log, not for a harvester tuning its next attempt."""
    return completion.finish_reason == "refused"


def _check_model(app: FastAPI, model: str) -> None:
    if model != app.state.model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {app.state.model_name!r}.",
                       code="model_not_found")


def chat_prompt(messages: list[ChatMessage], sealer: Sealer | None = None) -> Conversation:
    """The prompt a conversation becomes: a `Conversation` carrying every message, which a local model's chat
    template reads whole (`guard.prompts`) and a remote backend forwards to its chat endpoint. Its text (what
    the monitor, the audit log and `detect` read) is every turn the client wrote, not only the last: a question
    put in a system turn, or an earlier one, behind an innocuous last message is read where it was asked.

    Sealed reasoning handed back in an assistant turn is opened (bound to the conversation before it: refused if
    altered, from another key, or moved to another conversation) and put back into its turn, so that the model
    reads the reasoning it wrote."""
    turns: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        content = m.content
        if m.sealed_reasoning is not None:
            if sealer is None:
                raise APIError(400, f"messages[{i}].sealed_reasoning: this server does not seal reasoning")
            if m.role != "assistant":
                raise APIError(400, f"messages[{i}].sealed_reasoning: only an assistant turn carries sealed reasoning")
            try:
                content = restore_reasoning(m.content, sealer.open(m.sealed_reasoning, asked(turns)))
            except SealError as e:
                raise APIError(400, f"messages[{i}].sealed_reasoning: {e}", code="invalid_sealed_reasoning") from None
        turns.append({"role": m.role, "content": content})
    return asked(turns)


def asked(turns: list[dict[str, str]]) -> Conversation:
    return Conversation("\n".join(t["content"] for t in turns if t["role"] in ASKING_ROLES), turns)


ASKING_ROLES = ("system", "developer", "user")  # the turns a client writes; assistant and tool turns answer


def prompt_tokens(teacher: Teacher, prompts: list[str]) -> list[int]:
    """Tokens in each prompt as the local model reads it (its chat template applied where it has one). A remote
    backend's tokenizer is not known here, so its prompts count 0."""
    if teacher.tokenizer is None:
        return [0] * len(prompts)
    try:
        return [len(ids) for ids in prompt_ids(teacher.tokenizer, prompts)]
    except TemplateError as e:  # the model's template refuses the conversation (roles that must alternate...)
        raise APIError(400, f"messages: this model's chat template refuses the conversation: {e}",
                       code="invalid_conversation") from None


def _billed_prompt(counted: int, completion: Completion) -> int:
    """The prompt's tokens to bill: the gateway's own count, or the backend's where the gateway cannot count
    (a remote backend's tokenizer is not known here)."""
    return completion.prompt_tokens if not counted and completion.prompt_tokens is not None else counted


UPSTREAM_FAILURES = {  # the first that fits is what the client is told (no upstream address or key in it; the log
    # has the rest)
    TeacherTimeout: ("The upstream model server did not answer in time.", "upstream_timeout"),
    TeacherAuthError: ("The upstream model server refused the gateway's upstream credentials; the provider must "
                       "fix the gateway's upstream key.", "upstream_auth_failed"),
    TeacherHTTPError: ("The upstream model server failed to answer.", "upstream_failed"),
}


def _check_context(teacher: Teacher, counts: list[int], max_tokens: int) -> None:
    limit = teacher.context_length
    for n in counts:
        if n == 0 and teacher.tokenizer is not None:  # a remote teacher's prompts count 0: its server judges
            raise APIError(400, "The prompt is empty: it has no tokens for the model to continue.",
                           code="empty_prompt")
        if limit is not None and n + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion). "
                                "Reduce the prompt or max_tokens.", code="context_length_exceeded")


def _check_length(request: Request, caller: Caller, endpoint: str, prompts: list[str], counts: list[int],
                  max_tokens: int, started: float, request_id: str) -> None:
    """`_check_context`, and a request it turns away is still its account's traffic: the defences that keep
    history observe it (as the monitor counts an over-long prompt sent to a local teacher), and the audit log
    keeps its rows (status 400), so that `detect` on the log sees what the monitor saw."""
    try:
        _check_context(request.app.state.teacher, counts, max_tokens)
    except APIError as error:
        if error.detail["code"] == "context_length_exceeded":
            request.app.state.teacher.observe(prompts, [caller] * len(prompts))
            for index, (prompt, n) in enumerate(zip(prompts, counts)):
                _audit(request, caller, endpoint, prompt, Completion(text="", finish_reason="context_length"), n,
                       started, request_id=row_id(request_id, index, len(prompts)))
            error.headers = {**(error.headers or {}), "x-request-id": request_id}  # the client can find its row
        raise


def _complete(request: Request, prompt: str, sampling: Sampling, caller: Caller, stops: list[str]) -> Completion:
    """The completion for `caller` as the teacher (with its inner defences) wrote it, before the account's
    redaction policy, ending before the first of `stops`."""
    return _complete_all(request, [prompt], sampling, caller, stops)[0]


def _complete_all(request: Request, prompts: list[str], sampling: Sampling, caller: Caller,
                  stops: list[str]) -> list[Completion]:
    """`_complete` for each of one request's prompts."""
    return [_stopped(completion, stops) for completion in _generated(request, prompts, sampling, caller)]


def _stopped(completion: Completion, stops: list[str]) -> Completion:
    """The completion ending before the first of `stops`, finish_reason "stop", as OpenAI's `stop` serves it. The
    tokens generated past it are still billed: they were generated."""
    cut = min((at for stop in stops if (at := completion.text.find(stop)) >= 0), default=None)
    if cut is None:
        return completion
    return dataclasses.replace(completion, text=completion.text[:cut], finish_reason="stop")


def _generated(request: Request, prompts: list[str], sampling: Sampling, caller: Caller) -> list[Completion]:
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


def _served(policy: Policy, prompt: str, completion: Completion) -> Completion:
    """The completion as `policy` serves it whole, the policy named in its audit row."""
    [served] = redact_completions(policy, [prompt], [completion])
    served.decisions["redaction"] = policy.name
    return served


def _top(step) -> list[TopLogprob]:
    return [TopLogprob(token=t.token, logprob=t.logprob) for t in step]


PIECE = re.compile(r"\s*\S+\s*|\s+")  # a word with the spaces around it: the pieces join back to the text


def _streamed(completion: Completion, prompt: str, policy: Policy) -> list[tuple[str, str | None]]:
    """(text delta, sealed reasoning) as the policy lets them out: piece by piece for one that streams, at the
    end for one that may withhold reasoning. Made once, before the audit row (which holds what is sent, and
    names the policy) and the stream."""
    completion.decisions["redaction"] = policy.name
    redactor, pieces = StreamRedactor(policy, prompt), []
    for piece in PIECE.findall(completion.text):
        if delta := redactor.feed(piece):
            pieces.append((delta, None))
    last = redactor.finish(cut=completion.finish_reason == "length")
    if last or redactor.sealed:
        pieces.append((last, redactor.sealed))
    return pieces


def _joined(pieces: list[tuple[str, str | None]]) -> str:
    return "".join(text for text, _ in pieces)


def _sse(chunks: Iterator[BaseModel], request_id: str, headers: Mapping[str, str]) -> StreamingResponse:
    """The stream of `chunks`, with the route's `headers` (its rate-limit headers: a response the route returns
    itself does not get those it set on the `Response` it was given)."""
    def events():
        for chunk in chunks:
            yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**headers, "x-request-id": request_id})


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _Bounded:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before anything parses it, an
    unexpected exception becomes a generic 500 in OpenAI's shape, its traceback logged here, never sent, and
    every request is counted and timed in `metrics` (to its last byte, a stream's too). Pure ASGI: Starlette's
    `@app.middleware("http")` would cost a task and a memory stream per request."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 499  # stays so only when the client went away before any answer

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._bounded(scope, receive, counted)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"  # bounded label values
            self.metrics.requests.labels(path=path, status=str(status)).inc()
            self.metrics.latency.labels(path=path).observe(time.perf_counter() - start)

    async def _bounded(self, scope, receive, send):
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._error(send, 413, f"The request body is over the limit of {self.max_bytes} bytes.",
                                     "request_too_large")
        body, more = b"", True
        while more:  # read in full, to the limit, whatever the declared length says
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._error(send, 413, f"The request body is over the limit of {self.max_bytes} "
                                                    "bytes.", "request_too_large")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # a streaming response listens here for the client going away
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked)
        except UNAVAILABLE as e:  # no request is served without its audit row: the client may retry elsewhere
            logger.error("the store is unavailable serving %s: %s: %s", scope.get("path"), type(e).__name__, e)
            if not started:
                await self._error(send, 503, "The gateway's store is unavailable; retry shortly.",
                                  "store_unavailable", kind="server_error")
        except Exception:
            logger.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await self._error(send, 500, "The server had an error while processing your request.",
                                  kind="server_error")

    @staticmethod
    async def _error(send, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error"):
        body = json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _FromProxies:
    """ASGI middleware: behind trusted proxies (a load balancer, an upstream gateway), the client is the address
    they forward (X-Forwarded-For, read by uvicorn's own middleware), and the request remembers whether it came
    through one (`scope["state"]["via_trusted_proxy"]`), so that a header naming the end user is taken only from
    them. Anyone else's forwarding headers are ignored: a client cannot pick its address."""

    def __init__(self, app, trusted: list[str]):
        self.forwarded = ProxyHeadersMiddleware(app, trusted_hosts=trusted)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            peer = scope["client"][0] if scope.get("client") else None
            scope.setdefault("state", {})["via_trusted_proxy"] = peer in self.forwarded.trusted_hosts
        return await self.forwarded(scope, receive, send)


def create_app(load_teacher: Callable[[], Teacher], model_name: str, api_keys: set[str] | None = None,
               sealer: Sealer | None = None, policy: Policy | None = None, max_body_bytes: int = MiB,
               max_prompts: int = 64, store: Store | None = None, rate_window: float = 60.0,
               batch_window: float = 0.0, max_batch: int = 16, max_queue: int = 1024,
               summarize: Summarize | None = None,
               admin_key: str | None = None, retention: float | None = None,
               key_cache_seconds: float = 5.0, lab_clock: bool = False,
               shared: SharedState | None = None, trusted_proxies: list[str] | None = None,
               end_user_header: str | None = None, public_docs: bool = False,
               metrics_on_api_port: bool = True) -> FastAPI:
    """Serve the teacher that `load_teacher` builds (called once, at start-up) as `model_name`.

    Args:
        policy: the gateway's redaction, applied on top of the teacher to whole answers and, through its
            `StreamRedactor`, to streams, for every account whose key names no policy of its own (a key's
            policy, `keys create --policy`, takes its place). None serves the teacher's text as it comes
            (`Full`).
        sealer: seals reasoning for the `sealed` policy (the gateway's or an account's) and opens the sealed
            reasoning clients hand back. Without one, a live key with the `sealed` policy is a ValueError here,
            and a `sealed` key created while the gateway runs is refused with 403 (`policy_unavailable`).
        summarize: writes the `summary` policy's summaries (default: an outline that tells nothing).
        max_body_bytes: larger request bodies are refused with 413.
        max_prompts: the most prompts one completions request may carry.
        store: API keys (hashed) and their accounts, and the audit log: each request's row is durable before
            its response is sent. Without it, `api_keys` (if any) are accepted as accounts key-0, key-1, ...
        rate_window: seconds over which each account's requests per minute and tokens per minute (from the
            store) are counted; a minute, as the limits say, except in tests.
        batch_window, max_batch: concurrent requests reach the teacher in batches (`guard.batcher`): those queued
            while it generates, and those that arrive within `batch_window` seconds, up to `max_batch`;
            `max_batch=1` serialises them. At most `max_queue` prompts wait; past that a request is a 503 with
            Retry-After, and a client that goes away while it waits has its prompts dropped, never generated.
        admin_key: enables the admin API (`guard.admin`) behind this key; it needs `store`. Only its digest
            is kept.
        retention: seconds an audit row is kept; older rows are purged at start-up and then periodically.
        key_cache_seconds: how long a key the store resolved is taken without asking the store again, so the
            longest a revoked key is still served (`KeyCache`); 0 asks the store on every request.
        lab_clock: a lab gateway: each caller's time (what the monitor judges, and the audit row's time) is the
            simulated time its client sends in the `LAB_TIME_HEADER`. Never in production.
        shared: Redis, shared with the other replicas of this gateway: the rate limits are counted there (a
            monitor among the teacher's defences shares its state through `DefenseParts.shared`), and its
            failures are counted in this app's metrics.
        trusted_proxies: addresses or networks (CIDR) of the proxies in front of the gateway (a load balancer,
            an upstream gateway): from them, the client's address is the one they forward (X-Forwarded-For), so
            that accounts behind one balancer are not all on its network. From anyone else forwarding headers
            are ignored. None trusts no one.
        end_user_header: a header in which a trusted proxy names the end user it serves under one key; the
            monitor and the audit log then see each end user as "account/user" (rate limits stay the key's).
        public_docs: serve `/docs`, `/redoc` and `/openapi.json` (a map of the API for anyone who asks: off unless
            wanted).
        metrics_on_api_port: serve the Prometheus metrics at `/metrics` on this app, behind the admin key when
            the gateway has one. False when they are served on a port of their own (`serve --metrics-port`).
    """
    if (admin_key is not None or retention is not None) and store is None:
        raise ValueError("the admin API and retention act on the audit log: they need a store (--store)")
    policies = Policies(policy or Full(), sealer, summarize)
    for account in store.list_keys() if store is not None else ():
        if not account.revoked:
            try:
                policies(account.policy)  # built now, once; a tier this gateway cannot serve stops it here
            except ValueError as e:
                raise ValueError(f"the key {account.key_id} of account {account.name!r} has the policy "
                                 f"{account.policy!r}: {e}") from None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.teacher = load_teacher()
        app.state.batcher = Batcher(batch_window, max_batch, max_queue).start()
        async with retention_kept(store, retention):
            yield
        app.state.batcher.stop()
        app.state.teacher = None

    documented = {} if public_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="distill-guard teacher server", lifespan=lifespan, **documented)
    app.state.model_name, app.state.api_keys = model_name, sorted(api_keys or ())
    limiter = RateLimiter(rate_window) if shared is None else RedisRateLimiter(shared, rate_window)
    app.state.store, app.state.limiter, app.state.metrics = store, limiter, Metrics()
    if shared is not None:
        app.state.metrics.registry.register(shared.failures)
        app.state.metrics.registry.register(shared.missed)
    app.state.policies = policies
    app.state.admin_digest = None if admin_key is None else admin_digest(admin_key)
    app.state.keys = KeyCache(key_cache_seconds)
    app.add_middleware(_Bounded, max_bytes=max_body_bytes, metrics=app.state.metrics)
    app.add_middleware(_FromProxies, trusted=trusted_proxies or [])
    app.state.end_user_header = end_user_header.lower() if end_user_header else None
    app.include_router(admin_router)
    app.state.lab_clock = lab_clock

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(TeacherHTTPError)
    async def upstream_error(request: Request, exc: TeacherHTTPError):
        logger.warning("upstream error serving %s: %s", request.url.path, exc)
        headers, status = {}, exc.status
        if isinstance(exc, TeacherRequestError) and exc.status == 429:  # the upstream limits the gateway's key
            error = {"message": "The upstream model server is busy; retry after the time in Retry-After.",
                     "type": "rate_limit_error", "code": "upstream_rate_limited"}
            headers = {"retry-after": exc.retry_after or "1"}
        elif isinstance(exc, TeacherRequestError) and exc.status != 404:  # the request's own fault: the client
            # fixes it, told what the upstream said (a context over its limit)
            error = {"message": exc.message, "type": exc.kind, "code": exc.code}
        else:  # a 404 is the gateway's configuration (an upstream model or route that is not there), not the client's
            message, code = next(told for kind, told in UPSTREAM_FAILURES.items() if isinstance(exc, kind))
            error = {"message": message, "type": "server_error", "code": code}
            status = 502 if isinstance(exc, TeacherRequestError) else exc.status
        return JSONResponse({"error": error}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # the framework's own errors (an unknown path, a body it cannot parse) in the same shape as ours
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "code": None}},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        told = "this server does not take this field" if first.get("type") == "extra_forbidden" else first.get("msg")
        message = f"{where}: {told or 'invalid request'}" if where else told or "invalid request"
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": None}},
                            status_code=400)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok" if getattr(app.state, "teacher", None) is not None else "starting",
                "model": app.state.model_name}

    if metrics_on_api_port:
        @app.get("/metrics")
        def metrics(request: Request):
            if app.state.admin_digest is not None:  # a gateway with an admin surface keeps its metrics behind it
                require_admin(request)
            return PlainTextResponse(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def list_models(caller: Caller = Depends(require_caller)):
        return {"object": "list", "data": [{"id": app.state.model_name, "object": "model", "owned_by": "distill-guard"}]}

    @app.post("/v1/chat/completions", response_model=ChatResponse, response_model_exclude_none=True)
    def chat_completions(body: ChatRequest, request: Request, response: Response,
                         caller: Caller = Depends(require_caller), policy: Policy = Depends(account_policy)):
        _check_model(app, body.model)
        if not any(m.role == "user" for m in body.messages):
            raise APIError(400, "messages: at least one user message is required")
        if body.stream and body.logprobs:
            raise APIError(400, "logprobs are not streamed by this server; ask without stream=True")
        started, teacher, request_id = time.time(), app.state.teacher, f"chatcmpl-{uuid.uuid4().hex}"
        prompt = chat_prompt(body.messages, sealer)
        sampling = body.sampling((body.top_logprobs or 1) if body.logprobs else 0)
        [n_prompt] = prompt_tokens(teacher, [prompt])
        response.headers.update(admit(request, [n_prompt], sampling.max_new_tokens))
        _check_length(request, caller, "chat", [prompt], [n_prompt], sampling.max_new_tokens, started, request_id)
        if body.stream:
            raw = _complete(request, prompt, sampling, caller, body.stops)
            n_prompt = _billed_prompt(n_prompt, raw)
            pieces = _streamed(raw, prompt, policy)
            _audit(request, caller, "chat", prompt, raw, n_prompt, started, _joined(pieces), request_id=request_id)
            if refused(raw):
                raise _refusal(request_id)
            return _sse(_chat_chunks(body, n_prompt, raw, pieces, request_id), request_id, response.headers)
        completion = _served(policy, prompt, _complete(request, prompt, sampling, caller, body.stops))
        n_prompt = _billed_prompt(n_prompt, completion)
        _audit(request, caller, "chat", prompt, completion, n_prompt, started, request_id=request_id)
        if refused(completion):
            raise _refusal(request_id)
        logprobs = None
        if body.logprobs and completion.logprobs is not None:
            logprobs = ChatLogprobs(content=[
                TokenLogprobOut(token=chosen.token, logprob=chosen.logprob, top_logprobs=_top(step[: body.top_logprobs or 0]))
                for step, chosen in zip(completion.logprobs, completion.token_logprobs)])
        response.headers["x-request-id"] = request_id
        return ChatResponse(id=request_id, created=int(time.time()), model=body.model,
                            choices=[ChatChoice(index=0, message=ChatMessageOut(content=completion.text,
                                                                       sealed_reasoning=completion.sealed_reasoning),
                                                logprobs=logprobs, finish_reason=completion.finish_reason)],
                            usage=_usage(n_prompt, completion.completion_tokens))

    def _chat_chunks(body: ChatRequest, n_prompt: int, completion: Completion,
                     pieces: list[tuple[str, str | None]], request_id: str) -> Iterator[ChatChunk]:
        # `object` is set, not left to its default, so that a chunk sent without its unset fields keeps it
        head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.model}
        yield ChatChunk(**head, choices=[ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""),
                                                         finish_reason=None)])
        for text, sealed in pieces:
            delta = ChatDelta(content=text) if sealed is None else ChatDelta(content=text, sealed_reasoning=sealed)
            yield ChatChunk(**head, choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=None)])
        yield ChatChunk(**head, choices=[ChatChunkChoice(index=0, delta=ChatDelta(),
                                                         finish_reason=completion.finish_reason)])
        if body.include_usage:  # hidden reasoning is billed: the count is the teacher's, before redaction
            yield ChatChunk(**head, choices=[], usage=_usage(n_prompt, completion.completion_tokens))

    @app.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True)
    def completions(body: CompletionRequest, request: Request, response: Response,
                    caller: Caller = Depends(require_caller), policy: Policy = Depends(account_policy)):
        _check_model(app, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt: at least one prompt is required")
        if len(prompts) > max_prompts:
            raise APIError(400, f"prompt: {len(prompts)} prompts in one request; this server takes at most "
                                f"{max_prompts}")
        if body.stream and body.logprobs:
            raise APIError(400, "logprobs are not streamed by this server; ask without stream=True")
        started, teacher, request_id = time.time(), app.state.teacher, f"cmpl-{uuid.uuid4().hex}"
        sampling = body.sampling(body.logprobs or 0)
        counts = prompt_tokens(teacher, prompts)
        response.headers.update(admit(request, counts, sampling.max_new_tokens))
        _check_length(request, caller, "completions", prompts, counts, sampling.max_new_tokens, started, request_id)
        if body.stream:
            answers = _complete_all(request, prompts, sampling, caller, body.stops)
            counts = [_billed_prompt(n, answer) for n, answer in zip(counts, answers)]
            pieces = [_streamed(answer, prompt, policy) for prompt, answer in zip(prompts, answers)]
            for index, (prompt, n, answer) in enumerate(zip(prompts, counts, answers)):
                _audit(request, caller, "completions", prompt, answer, n, started, _joined(pieces[index]),
                       request_id=row_id(request_id, index, len(prompts)))
            if any(map(refused, answers)):
                raise _refusal(request_id)
            return _sse(_completion_chunks(body, counts, answers, pieces, request_id), request_id,
                        response.headers)
        written = _complete_all(request, prompts, sampling, caller, body.stops)
        served = [_served(policy, prompt, completion) for prompt, completion in zip(prompts, written)]
        for index, (prompt, completion) in enumerate(zip(prompts, served)):  # every prompt logged, refused or not
            counts[index] = _billed_prompt(counts[index], completion)
            _audit(request, caller, "completions", prompt, completion, counts[index], started,
                   request_id=row_id(request_id, index, len(prompts)))
        if any(map(refused, served)):
            raise _refusal(request_id)
        choices, total = [], 0
        for index, completion in enumerate(served):
            logprobs = None
            if body.logprobs and completion.logprobs is not None:
                logprobs = CompletionLogprobs(
                    tokens=[t.token for t in completion.token_logprobs],
                    token_logprobs=[t.logprob for t in completion.token_logprobs],
                    top_logprobs=[{t.token: t.logprob for t in step} for step in completion.logprobs])
            choices.append(CompletionChoice(index=index, text=completion.text, logprobs=logprobs,
                                            sealed_reasoning=completion.sealed_reasoning,
                                            finish_reason=completion.finish_reason))
            total += completion.completion_tokens
        response.headers["x-request-id"] = request_id
        return CompletionResponse(id=request_id, created=int(time.time()), model=body.model,
                                  choices=choices, usage=_usage(sum(counts), total))

    def _completion_chunks(body: CompletionRequest, counts: list[int], answers: list[Completion],
                           pieces: list[list[tuple[str, str | None]]], request_id: str) -> Iterator[CompletionChunk]:
        head = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        for index, completion in enumerate(answers):
            for text, sealed in pieces[index]:
                choice = CompletionChunkChoice(index=index, text=text, finish_reason=None)
                if sealed is not None:
                    choice.sealed_reasoning = sealed
                yield CompletionChunk(**head, choices=[choice])
            yield CompletionChunk(**head, choices=[CompletionChunkChoice(index=index, text="",
                                                                         finish_reason=completion.finish_reason)])
        if body.include_usage:
            billed = sum(c.completion_tokens for c in answers)
            yield CompletionChunk(**head, choices=[], usage=_usage(sum(counts), billed))

    return app


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serve_in_thread(app: FastAPI, port: int | None = None, start_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn on loopback (`port`, or a free one) in a thread of this process for the
    duration of the block, which gets the base URL: for tests, experiments and notebooks. A deployment runs
    `distill-guard gateway` instead."""
    # Bound here and handed to uvicorn: a port merely found free could be taken by another process (another
    # test worker) before uvicorn bound it.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own bind does
    listener.bind(("127.0.0.1", 0 if port is None else port))
    port = listener.getsockname()[1]
    # proxy_headers off: which proxies are trusted is the app's to say (`trusted_proxies`), not uvicorn's default
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           proxy_headers=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()
