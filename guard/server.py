"""An OpenAI-compatible server for any Teacher: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

It is the seed of the gateway: routes are thin, auth is a dependency, and the teacher (defences and
all) is created once in the lifespan. `stream=True` answers in OpenAI's server-sent-event chunks. Generation
is not token-streamed: a completion is generated whole, then sent out through the redaction policy's
`StreamRedactor`, so a policy that may withhold reasoning sends nothing until the end and never takes back
what it sent.

Bounds answer in OpenAI's error shape, never as a 500 with a traceback: a body over `max_body_bytes` is 413
before it is parsed; prompt plus `max_tokens` beyond the model's context, more than `max_prompts` prompts,
and malformed JSON are 400; anything unexpected is a 500 with a generic message, logged here in full.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from transformers import PreTrainedTokenizerBase

from guard.redaction import Full, Policy, Redact, Sealer, SealError, StreamRedactor
from guard.store import Account, AuditRecord, Store
from guard.teacher import LAB_TIME_HEADER, Caller, Completion, Sampling, Teacher

logger = logging.getLogger(__name__)
MiB = 1 << 20


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str
    sealed_reasoning: str | None = None  # handed back from an earlier assistant turn; checked, never trusted


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension (as in vLLM): sample from the k most likely tokens")
    max_tokens: int | None = Field(None, ge=1, le=4096)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, logprobs: int) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
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


class APIError(HTTPException):
    """An error in OpenAI's shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(status_code=status, detail={"message": message, "type": kind, "code": code},
                         headers=headers)


class RateLimiter:
    """Requests and tokens per account over a sliding window (a minute by default), in this process's memory.

    A request is admitted while its account sent fewer than `rpm` requests and used fewer than `tpm` tokens in
    the window; tokens are charged when a completion is done (a stream's too). Memory per account is bounded
    by its limits. (Counters shared by replicas belong in Redis: issue 17.)
    """

    def __init__(self, window: float = 60.0):
        self.window = window
        self.requests: dict[str, deque[float]] = defaultdict(deque)
        self.tokens: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.lock = threading.Lock()

    def _trim(self, account: str, now: float) -> None:
        requests, tokens = self.requests[account], self.tokens[account]
        while requests and requests[0] <= now - self.window:
            requests.popleft()
        while tokens and tokens[0][0] <= now - self.window:
            tokens.popleft()

    def admit(self, account: Account, now: float) -> dict[str, str]:
        """The rate-limit headers for this request; raises a 429 with Retry-After when a limit is reached."""
        with self.lock:
            self._trim(account.name, now)
            requests, tokens = self.requests[account.name], self.tokens[account.name]
            used = sum(n for _, n in tokens)
            headers, waits = {}, []
            if account.rpm is not None:
                headers |= {"x-ratelimit-limit-requests": str(account.rpm),
                            "x-ratelimit-remaining-requests": str(max(0, account.rpm - len(requests) - 1))}
                if len(requests) >= account.rpm:
                    waits.append(requests[0] + self.window - now)
                headers["x-ratelimit-reset-requests"] = f"{(requests[0] + self.window - now) if requests else 0:.3f}s"
            if account.tpm is not None:
                headers |= {"x-ratelimit-limit-tokens": str(account.tpm),
                            "x-ratelimit-remaining-tokens": str(max(0, account.tpm - used)),
                            "x-ratelimit-reset-tokens": f"{(tokens[0][0] + self.window - now) if tokens else 0:.3f}s"}
                if used >= account.tpm:
                    waits.append(tokens[0][0] + self.window - now)
            if waits:
                retry = max(1, math.ceil(max(waits)))
                raise APIError(429, f"Rate limit reached for account {account.name!r}; retry in {retry} s.",
                               "rate_limit_error", "rate_limit_exceeded",
                               headers={**headers, "retry-after": str(retry)})
            if account.rpm is not None:
                requests.append(now)
            return headers

    def charge(self, account: str, tokens: int, now: float) -> None:
        with self.lock:
            self.tokens[account].append((now, tokens))


def resolve_account(request: Request) -> Account | None:
    """The account behind the request's bearer key: through the store's hashed keys, or the server's own key
    list compared in constant time (accounts key-0, key-1, ...); None when the server takes no keys."""
    state = request.app.state
    if state.store is None and not state.api_keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    account = None
    if scheme.lower() == "bearer" and token:
        if state.store is not None:
            account = state.store.resolve(token)
        else:
            names = [f"key-{i}" for i, key in enumerate(state.api_keys)
                     if hmac.compare_digest(key.encode(), token.encode())]
            account = Account(names[0], key_id=names[0]) if names else None
    if account is None:
        raise APIError(401, "Incorrect or missing API key.", "invalid_request_error", "invalid_api_key")
    return account


def require_caller(request: Request, response: Response,
                   account: Account | None = Depends(resolve_account)) -> Caller:
    """The caller every defence acts for: the key's account and the client's address (anonymous without keys),
    admitted by the account's rate limits. A lab gateway (`lab_clock`) takes the caller's time from the
    `LAB_TIME_HEADER`, so that an experiment's simulated clock reaches the monitor; any other ignores it."""
    ip = request.client.host if request.client else None
    when = _lab_time(request) if request.app.state.lab_clock else None
    if account is None:
        return Caller(ip=ip, time=when)
    response.headers.update(request.app.state.limiter.admit(account, time.time()))
    return Caller(account=account.name, ip=ip, time=when)


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


def _refusal() -> APIError:
    return APIError(403, "The provider's traffic policy refused this request.", "permission_error", "refused")


def _audit(request: Request, caller: Caller, endpoint: str, prompt: str, completion: Completion, n_prompt: int,
           started: float, response: str | None = None) -> None:
    """Charge the account its tokens and write one durable audit row for the request, before any of the
    response is sent. `response`: the text the client gets, when it is not `completion.text` (a stream
    redacted as it goes out)."""
    state = request.app.state
    state.metrics.tokens.labels(kind="prompt").inc(n_prompt)
    state.metrics.tokens.labels(kind="completion").inc(completion.completion_tokens)
    if state.store is not None or state.api_keys:
        state.limiter.charge(caller.account, n_prompt + completion.completion_tokens, time.time())
    store = state.store
    if store is None:
        return
    decisions = {**completion.decisions, **({"served": "refused"} if completion.finish_reason == "refused" else {})}
    store.log(AuditRecord(request_id=f"req-{uuid.uuid4().hex}", account=caller.account,
                          time=started if caller.time is None else caller.time,
                          prompt=prompt, response=completion.text if response is None else response,
                          prompt_tokens=n_prompt,
                          completion_tokens=completion.completion_tokens, decisions=decisions,
                          latency=time.time() - started, status=403 if refused(completion) else 200,
                          ip=caller.ip, endpoint=endpoint))


def refused(completion: Completion) -> bool:
    """A defence refused to serve it (the monitor's block or throttle). The client is told no more than that:
    the reason is for the provider's audit log, not for a harvester tuning its next attempt."""
    return completion.finish_reason == "refused"


def _check_model(app: FastAPI, model: str) -> None:
    if model != app.state.model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {app.state.model_name!r}.",
                       code="model_not_found")


def chat_prompt(messages: list[ChatMessage], tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The prompt a conversation becomes: the model's chat template over every message when its tokenizer has
    one; otherwise the last user message verbatim, the form the reference lab's teachers (no template) were
    trained on. (Issue 16 makes chat templates first-class.)"""
    if tokenizer is not None and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                             add_generation_prompt=True, tokenize=False)
    return [m.content for m in messages if m.role == "user"][-1]


def prompt_tokens(teacher: Teacher, prompts: list[str]) -> list[int]:
    """Tokens in each prompt, counted as the local model counts them. A remote backend's tokenizer is not known
    here, so its prompts count 0."""
    if teacher.tokenizer is None:
        return [0] * len(prompts)
    return [len(ids) for ids in teacher.tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]]


def _check_context(teacher: Teacher, counts: list[int], max_tokens: int) -> None:
    limit = teacher.context_length
    for n in counts:
        if limit is not None and n + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion). "
                                "Reduce the prompt or max_tokens.", code="context_length_exceeded")


def _complete(request: Request, prompt: str, sampling: Sampling, caller: Caller, raw: bool = False) -> Completion:
    """The completion as served to `caller`, or with `raw` as the teacher wrote it, before the server's
    redaction policy."""
    state = request.app.state
    with state.lock:  # one generate at a time keeps seeded sampling reproducible
        return (state.teacher if raw else state.served).complete([prompt], sampling, [caller])[0]


def _check_sealed(sealer: Sealer | None, messages: list[ChatMessage],
                  tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Refuse a conversation whose handed-back sealed reasoning was altered or came from elsewhere. A blob is
    bound to the prompt its turn answered: the conversation before it."""
    for i, m in enumerate(messages):
        if m.sealed_reasoning is None:
            continue
        if sealer is None:
            raise APIError(400, f"messages[{i}].sealed_reasoning: this server does not seal reasoning")
        try:
            earlier = messages[:i]
            sealer.open(m.sealed_reasoning, chat_prompt(earlier, tokenizer) if any(e.role == "user" for e in earlier)
                        else "")
        except SealError as e:
            raise APIError(400, f"messages[{i}].sealed_reasoning: {e}", code="invalid_sealed_reasoning") from None


def _top(step) -> list[TopLogprob]:
    return [TopLogprob(token=t.token, logprob=t.logprob) for t in step]


PIECE = re.compile(r"\s*\S+\s*|\s+")  # a word with the spaces around it: the pieces join back to the text


def _streamed(completion: Completion, prompt: str, policy: Policy) -> Iterator[tuple[str, str | None]]:
    """(text delta, sealed reasoning) as the policy lets them out: piece by piece for one that streams, at the
    end for one that may withhold reasoning."""
    redactor = StreamRedactor(policy, prompt)
    for piece in PIECE.findall(completion.text):
        if delta := redactor.feed(piece):
            yield delta, None
    last = redactor.finish()
    if last or redactor.sealed:
        yield last, redactor.sealed


def _sse(chunks: Iterator[BaseModel]) -> StreamingResponse:
    def events():
        for chunk in chunks:
            yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _Bounded:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before anything parses it, and an
    unexpected exception becomes a generic 500 in OpenAI's shape, its traceback logged here, never sent."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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


def create_app(load_teacher: Callable[[], Teacher], model_name: str, api_keys: set[str] | None = None,
               sealer: Sealer | None = None, policy: Policy | None = None, max_body_bytes: int = MiB,
               max_prompts: int = 64, store: Store | None = None, rate_window: float = 60.0,
               lab_clock: bool = False) -> FastAPI:
    """Serve the teacher that `load_teacher` builds (called once, at start-up) as `model_name`.

    Args:
        policy: the redaction the server applies on top of the teacher, to whole answers and, through its
            `StreamRedactor`, to streams. None serves the teacher's text as it comes (streamed as `Full`).
        sealer: opens the sealed reasoning clients hand back (the one the `sealed` policy seals with).
        max_body_bytes: larger request bodies are refused with 413.
        max_prompts: the most prompts one completions request may carry.
        store: API keys (hashed) and their accounts, and the audit log: each request's row is durable before
            its response is sent. Without it, `api_keys` (if any) are accepted as accounts key-0, key-1, ...
        rate_window: seconds over which each account's requests per minute and tokens per minute (from the
            store) are counted; a minute, as the limits say, except in tests.
        lab_clock: a lab gateway: each caller's time (what the monitor judges, and the audit row's time) is the
            simulated time its client sends in the `LAB_TIME_HEADER`. Never in production.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.teacher = load_teacher()
        app.state.served = app.state.teacher if policy is None else Redact(app.state.teacher, policy)
        yield
        app.state.teacher = app.state.served = None

    app = FastAPI(title="distill-guard teacher server", lifespan=lifespan)
    app.state.model_name, app.state.api_keys, app.state.lock = model_name, sorted(api_keys or ()), threading.Lock()
    app.state.store, app.state.limiter, app.state.metrics = store, RateLimiter(rate_window), Metrics()
    app.state.lab_clock = lab_clock
    app.add_middleware(_Bounded, max_bytes=max_body_bytes)
    stream_policy = policy or Full()

    def _sent(completion: Completion, prompt: str) -> str:
        """The text a stream of `completion` sends, under the server's policy (which the audit row names)."""
        if policy is not None:
            completion.decisions["redaction"] = policy.name
        return stream_policy.redact([prompt], [completion.text])[0].text

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": None}},
                            status_code=400)

    @app.middleware("http")
    async def measured(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        path = request.url.path if request.url.path in KNOWN_PATHS else "other"  # bounded label values
        app.state.metrics.requests.labels(path=path, status=str(response.status_code)).inc()
        app.state.metrics.latency.labels(path=path).observe(time.perf_counter() - start)
        return response

    @app.get("/healthz")
    def healthz():
        return {"status": "ok" if getattr(app.state, "teacher", None) is not None else "starting",
                "model": app.state.model_name}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def list_models(caller: Caller = Depends(require_caller)):
        return {"object": "list", "data": [{"id": app.state.model_name, "object": "model", "owned_by": "distill-guard"}]}

    @app.post("/v1/chat/completions", response_model=ChatResponse, response_model_exclude_none=True)
    def chat_completions(body: ChatRequest, request: Request, caller: Caller = Depends(require_caller)):
        _check_model(app, body.model)
        if not any(m.role == "user" for m in body.messages):
            raise APIError(400, "messages: at least one user message is required")
        if body.stream and body.logprobs:
            raise APIError(400, "logprobs are not streamed by this server; ask without stream=True")
        started, teacher = time.time(), app.state.teacher
        _check_sealed(sealer, body.messages, teacher.tokenizer)
        prompt = chat_prompt(body.messages, teacher.tokenizer)
        sampling = body.sampling((body.top_logprobs or 1) if body.logprobs else 0)
        [n_prompt] = prompt_tokens(teacher, [prompt])
        _check_context(teacher, [n_prompt], sampling.max_new_tokens)
        if body.stream:
            raw = _complete(request, prompt, sampling, caller, raw=True)
            _audit(request, caller, "chat", prompt, raw, n_prompt, started, _sent(raw, prompt))
            if refused(raw):
                raise _refusal()
            return _sse(_chat_chunks(body, prompt, n_prompt, raw))
        completion = _complete(request, prompt, sampling, caller)
        _audit(request, caller, "chat", prompt, completion, n_prompt, started)
        if refused(completion):
            raise _refusal()
        logprobs = None
        if body.logprobs and completion.logprobs is not None:
            logprobs = ChatLogprobs(content=[
                TokenLogprobOut(token=chosen.token, logprob=chosen.logprob, top_logprobs=_top(step[: body.top_logprobs or 0]))
                for step, chosen in zip(completion.logprobs, completion.token_logprobs)])
        return ChatResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                            choices=[ChatChoice(index=0, message=ChatMessageOut(content=completion.text,
                                                                       sealed_reasoning=completion.sealed_reasoning),
                                                logprobs=logprobs, finish_reason=completion.finish_reason)],
                            usage=_usage(n_prompt, completion.completion_tokens))

    def _chat_chunks(body: ChatRequest, prompt: str, n_prompt: int, completion: Completion) -> Iterator[ChatChunk]:
        # `object` is set, not left to its default, so that a chunk sent without its unset fields keeps it
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.model}
        yield ChatChunk(**head, choices=[ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""),
                                                         finish_reason=None)])
        for text, sealed in _streamed(completion, prompt, stream_policy):
            delta = ChatDelta(content=text) if sealed is None else ChatDelta(content=text, sealed_reasoning=sealed)
            yield ChatChunk(**head, choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=None)])
        yield ChatChunk(**head, choices=[ChatChunkChoice(index=0, delta=ChatDelta(),
                                                         finish_reason=completion.finish_reason)])
        if body.include_usage:  # hidden reasoning is billed: the count is the teacher's, before redaction
            yield ChatChunk(**head, choices=[], usage=_usage(n_prompt, completion.completion_tokens))

    @app.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True)
    def completions(body: CompletionRequest, request: Request, caller: Caller = Depends(require_caller)):
        _check_model(app, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt: at least one prompt is required")
        if len(prompts) > max_prompts:
            raise APIError(400, f"prompt: {len(prompts)} prompts in one request; this server takes at most "
                                f"{max_prompts}")
        if body.stream and body.logprobs:
            raise APIError(400, "logprobs are not streamed by this server; ask without stream=True")
        started, teacher = time.time(), app.state.teacher
        sampling = body.sampling(body.logprobs or 0)
        counts = prompt_tokens(teacher, prompts)
        _check_context(teacher, counts, sampling.max_new_tokens)
        if body.stream:
            answers = [_complete(request, prompt, sampling, caller, raw=True) for prompt in prompts]
            for prompt, n, answer in zip(prompts, counts, answers):
                _audit(request, caller, "completions", prompt, answer, n, started, _sent(answer, prompt))
            if any(map(refused, answers)):
                raise _refusal()
            return _sse(_completion_chunks(body, prompts, counts, answers))
        choices, total = [], 0
        for index, prompt in enumerate(prompts):
            completion = _complete(request, prompt, sampling, caller)
            _audit(request, caller, "completions", prompt, completion, counts[index], started)
            if refused(completion):
                raise _refusal()
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
        return CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                                  choices=choices, usage=_usage(sum(counts), total))

    def _completion_chunks(body: CompletionRequest, prompts: list[str], counts: list[int],
                           answers: list[Completion]) -> Iterator[CompletionChunk]:
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        for index, (prompt, completion) in enumerate(zip(prompts, answers)):
            for text, sealed in _streamed(completion, prompt, stream_policy):
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
