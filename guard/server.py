"""An OpenAI-compatible server for any Teacher: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

It is the seed of the gateway: routes are thin, auth is a dependency, and the teacher (defences and
all) is created once in the lifespan. A chat request's prompt is its last user message, verbatim.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from guard.redaction import Sealer, SealError
from guard.teacher import Completion, Sampling, Teacher


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str
    sealed_reasoning: str | None = None  # handed back from an earlier assistant turn; checked, never trusted


class SamplingFields(BaseModel):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension (as in vLLM): sample from the k most likely tokens")
    max_tokens: int | None = Field(None, ge=1, le=4096)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")

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


class APIError(HTTPException):
    """An error in OpenAI's shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(status_code=status, detail={"message": message, "type": kind, "code": code},
                         headers=headers)


def require_api_key(request: Request) -> str | None:
    keys = request.app.state.api_keys
    if not keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token not in keys:
        raise APIError(401, "Incorrect or missing API key.", "invalid_request_error", "invalid_api_key")
    return token


def _check_model(app: FastAPI, model: str) -> None:
    if model != app.state.model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {app.state.model_name!r}.",
                       code="model_not_found")


def _complete(request: Request, prompt: str, sampling: Sampling) -> Completion:
    with request.app.state.lock:  # one generate at a time keeps seeded sampling reproducible
        return request.app.state.teacher.complete([prompt], sampling)[0]


def _check_sealed(sealer: Sealer | None, messages: list[ChatMessage]) -> None:
    """Refuse a conversation whose handed-back sealed reasoning was altered or came from elsewhere."""
    last_user = ""
    for i, m in enumerate(messages):
        if m.role == "user":
            last_user = m.content
        if m.sealed_reasoning is None:
            continue
        if sealer is None:
            raise APIError(400, f"messages[{i}].sealed_reasoning: this server does not seal reasoning")
        try:
            sealer.open(m.sealed_reasoning, last_user)
        except SealError as e:
            raise APIError(400, f"messages[{i}].sealed_reasoning: {e}", code="invalid_sealed_reasoning") from None


def _top(step) -> list[TopLogprob]:
    return [TopLogprob(token=t.token, logprob=t.logprob) for t in step]


def create_app(load_teacher: Callable[[], Teacher], model_name: str, api_keys: set[str] | None = None,
               sealer: Sealer | None = None) -> FastAPI:
    """Serve the teacher that `load_teacher` builds (called once, at start-up) as `model_name`; `sealer` opens
    the sealed reasoning clients hand back (the one the teacher's `sealed` policy seals with)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.teacher = load_teacher()
        yield
        app.state.teacher = None

    app = FastAPI(title="distill-guard teacher server", lifespan=lifespan)
    app.state.model_name, app.state.api_keys, app.state.lock = model_name, set(api_keys or ()), threading.Lock()

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

    @app.get("/v1/models")
    def list_models(_: str | None = Depends(require_api_key)):
        return {"object": "list", "data": [{"id": app.state.model_name, "object": "model", "owned_by": "distill-guard"}]}

    @app.post("/v1/chat/completions", response_model=ChatResponse, response_model_exclude_none=True)
    def chat_completions(body: ChatRequest, request: Request, _: str | None = Depends(require_api_key)):
        _check_model(app, body.model)
        users = [m.content for m in body.messages if m.role == "user"]
        if not users:
            raise APIError(400, "messages: at least one user message is required")
        _check_sealed(sealer, body.messages)
        want = (body.top_logprobs or 1) if body.logprobs else 0
        completion = _complete(request, users[-1], body.sampling(want))
        logprobs = None
        if body.logprobs and completion.logprobs is not None:
            logprobs = ChatLogprobs(content=[
                TokenLogprobOut(token=chosen.token, logprob=chosen.logprob, top_logprobs=_top(step[: body.top_logprobs or 0]))
                for step, chosen in zip(completion.logprobs, completion.token_logprobs)])
        n = completion.completion_tokens
        return ChatResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                            choices=[ChatChoice(index=0, message=ChatMessageOut(content=completion.text,
                                                                       sealed_reasoning=completion.sealed_reasoning),
                                                logprobs=logprobs, finish_reason=completion.finish_reason)],
                            usage=Usage(completion_tokens=n, total_tokens=n))

    @app.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True)
    def completions(body: CompletionRequest, request: Request, _: str | None = Depends(require_api_key)):
        _check_model(app, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt: at least one prompt is required")
        choices, total = [], 0
        for index, prompt in enumerate(prompts):
            completion = _complete(request, prompt, body.sampling(body.logprobs or 0))
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
                                  choices=choices, usage=Usage(completion_tokens=total, total_tokens=total))

    return app

