"""A request's checks before generation: the model it names, the prompt a conversation becomes (its sealed
reasoning opened and checked), the prompt's tokens as the model reads them, and its length against the model's
context; a prompt turned away for its length still reaches the audit log and the defences that keep history."""

from __future__ import annotations

from fastapi import FastAPI, Request
from jinja2 import TemplateError

from guard.gateway import billing
from guard.gateway.api import ChatMessage
from guard.gateway.errors import APIError
from guard.prompts import Conversation, prompt_ids
from guard.reasoning import restore_reasoning
from guard.redaction import Sealer, SealError
from guard.teacher import Caller, Completion, Teacher


def check_model(app: FastAPI, model: str) -> None:
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


def check_context(teacher: Teacher, counts: list[int], max_tokens: int) -> None:
    limit = teacher.context_length
    for n in counts:
        if n == 0 and teacher.tokenizer is not None:  # a remote teacher's prompts count 0: its server judges
            raise APIError(400, "The prompt is empty: it has no tokens for the model to continue.",
                           code="empty_prompt")
        if limit is not None and n + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion). "
                                "Reduce the prompt or max_tokens.", code="context_length_exceeded")


def check_length(request: Request, caller: Caller, endpoint: str, prompts: list[str], counts: list[int],
                  max_tokens: int, started: float, request_id: str) -> None:
    """`check_context`, and a request it turns away is still its account's traffic: the defences that keep
    history observe it (as the monitor counts an over-long prompt sent to a local teacher), and the audit log
    keeps its rows (status 400), so that `detect` on the log sees what the monitor saw."""
    try:
        check_context(request.app.state.teacher, counts, max_tokens)
    except APIError as error:
        if error.detail["code"] == "context_length_exceeded":
            request.app.state.teacher.observe(prompts, [caller] * len(prompts))
            for index, (prompt, n) in enumerate(zip(prompts, counts)):
                billing.audit(request, caller, endpoint, prompt, Completion(text="", finish_reason="context_length"), n,
                       started, request_id=billing.row_id(request_id, index, len(prompts)))
            error.headers = {**(error.headers or {}), "x-request-id": request_id}  # the client can find its row
        raise
