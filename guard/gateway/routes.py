"""The gateway's routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/healthz` and `/metrics`.

Routes are thin: auth is a dependency (`guard.gateway.auth`), each step a call into a module of its own
(validation, rate limits, generation, billing, streaming), and what a route needs of the gateway it reads from
`request.app.state`, which `guard.gateway.app.create_app` fills. `metrics_router` is served only where the
metrics are on the API port."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from guard.gateway import billing, generation, streaming, validation
from guard.gateway.admin import require_admin
from guard.gateway.api import (ChatChoice, ChatLogprobs, ChatMessageOut, ChatRequest, ChatResponse, CompletionChoice,
                               CompletionLogprobs, CompletionRequest, CompletionResponse, TokenLogprobOut, TopLogprob,
                               usage)
from guard.gateway.auth import require_caller
from guard.gateway.errors import APIError
from guard.gateway.limits import admit
from guard.gateway.policies import account_policy
from guard.redaction import Policy
from guard.teacher import Caller, Completion

router = APIRouter()
metrics_router = APIRouter()


def _refusal(request_id: str) -> APIError:
    return APIError(403, "The provider's traffic policy refused this request.", "permission_error", "refused",
                    headers={"x-request-id": request_id})


def refused(completion: Completion) -> bool:
    """A defence refused to serve it (the monitor's block or throttle). The client is told no more than that:
    the reason is for the provider's audit log, not for a harvester tuning its next attempt."""
    return completion.finish_reason == "refused"


def _top(step) -> list[TopLogprob]:
    return [TopLogprob(token=t.token, logprob=t.logprob) for t in step]


@router.get("/healthz")
def healthz(request: Request):
    state = request.app.state
    return {"status": "ok" if getattr(state, "teacher", None) is not None else "starting",
            "model": state.model_name}


@metrics_router.get("/metrics")
def metrics(request: Request):
    state = request.app.state
    if state.admin_digest is not None:  # a gateway with an admin surface keeps its metrics behind it
        require_admin(request)
    return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
def list_models(request: Request, caller: Caller = Depends(require_caller)):
    name = request.app.state.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "distill-guard"}]}


@router.post("/v1/chat/completions", response_model=ChatResponse, response_model_exclude_none=True)
def chat_completions(body: ChatRequest, request: Request, response: Response,
                     caller: Caller = Depends(require_caller), policy: Policy = Depends(account_policy)):
    state = request.app.state
    validation.check_model(request.app, body.model)
    if not any(m.role == "user" for m in body.messages):
        raise APIError(400, "messages: at least one user message is required")
    if body.stream and body.logprobs:
        raise APIError(400, "logprobs are not streamed by this server; ask without stream=True")
    started, teacher, request_id = time.time(), state.teacher, f"chatcmpl-{uuid.uuid4().hex}"
    prompt = validation.chat_prompt(body.messages, state.sealer)
    sampling = body.sampling((body.top_logprobs or 1) if body.logprobs else 0)
    [n_prompt] = validation.prompt_tokens(teacher, [prompt])
    response.headers.update(admit(request, [n_prompt], sampling.max_new_tokens))
    validation.check_length(request, caller, "chat", [prompt], [n_prompt], sampling.max_new_tokens, started,
                            request_id)
    if body.stream:
        raw = generation.complete(request, prompt, sampling, caller, body.stops)
        n_prompt = billing.billed_prompt(n_prompt, raw)
        pieces = streaming.streamed(raw, prompt, policy)
        billing.audit(request, caller, "chat", prompt, raw, n_prompt, started, streaming.joined(pieces),
                      request_id=request_id)
        if refused(raw):
            raise _refusal(request_id)
        return streaming.sse(streaming.chat_chunks(body, n_prompt, raw, pieces, request_id), request_id,
                             response.headers)
    completion = generation.served(policy, prompt, generation.complete(request, prompt, sampling, caller, body.stops))
    n_prompt = billing.billed_prompt(n_prompt, completion)
    billing.audit(request, caller, "chat", prompt, completion, n_prompt, started, request_id=request_id)
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
                        usage=usage(n_prompt, completion.completion_tokens))


@router.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True)
def completions(body: CompletionRequest, request: Request, response: Response,
                caller: Caller = Depends(require_caller), policy: Policy = Depends(account_policy)):
    state = request.app.state
    validation.check_model(request.app, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt: at least one prompt is required")
    if len(prompts) > state.max_prompts:
        raise APIError(400, f"prompt: {len(prompts)} prompts in one request; this server takes at most "
                            f"{state.max_prompts}")
    if body.stream and body.logprobs:
        raise APIError(400, "logprobs are not streamed by this server; ask without stream=True")
    started, teacher, request_id = time.time(), state.teacher, f"cmpl-{uuid.uuid4().hex}"
    sampling = body.sampling(body.logprobs or 0)
    counts = validation.prompt_tokens(teacher, prompts)
    response.headers.update(admit(request, counts, sampling.max_new_tokens))
    validation.check_length(request, caller, "completions", prompts, counts, sampling.max_new_tokens, started,
                            request_id)
    if body.stream:
        answers = generation.complete_all(request, prompts, sampling, caller, body.stops)
        counts = [billing.billed_prompt(n, answer) for n, answer in zip(counts, answers)]
        pieces = [streaming.streamed(answer, prompt, policy) for prompt, answer in zip(prompts, answers)]
        for index, (prompt, n, answer) in enumerate(zip(prompts, counts, answers)):
            billing.audit(request, caller, "completions", prompt, answer, n, started, streaming.joined(pieces[index]),
                          request_id=billing.row_id(request_id, index, len(prompts)))
        if any(map(refused, answers)):
            raise _refusal(request_id)
        return streaming.sse(streaming.completion_chunks(body, counts, answers, pieces, request_id), request_id,
                             response.headers)
    written = generation.complete_all(request, prompts, sampling, caller, body.stops)
    served = [generation.served(policy, prompt, completion) for prompt, completion in zip(prompts, written)]
    for index, (prompt, completion) in enumerate(zip(prompts, served)):  # every prompt logged, refused or not
        counts[index] = billing.billed_prompt(counts[index], completion)
        billing.audit(request, caller, "completions", prompt, completion, counts[index], started,
                      request_id=billing.row_id(request_id, index, len(prompts)))
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
                              choices=choices, usage=usage(sum(counts), total))
