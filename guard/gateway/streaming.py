"""Streams (`stream=True`): a completion generated whole, then let out piece by piece through the account's
`StreamRedactor` as OpenAI's server-sent-event chunks, `data: [DONE]` last. A policy that may withhold reasoning
sends nothing until the end, and never takes back what it sent."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from guard.gateway.api import (ChatChunk, ChatChunkChoice, ChatDelta, ChatRequest, CompletionChunk,
                               CompletionChunkChoice, CompletionRequest, usage)
from guard.redaction import Policy, StreamRedactor
from guard.teacher import Completion


PIECE = re.compile(r"\s*\S+\s*|\s+")  # a word with the spaces around it: the pieces join back to the text


def streamed(completion: Completion, prompt: str, policy: Policy) -> list[tuple[str, str | None]]:
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


def joined(pieces: list[tuple[str, str | None]]) -> str:
    return "".join(text for text, _ in pieces)


def sse(chunks: Iterator[BaseModel], request_id: str, headers: Mapping[str, str]) -> StreamingResponse:
    """The stream of `chunks`, with the route's `headers` (its rate-limit headers: a response the route returns
    itself does not get those it set on the `Response` it was given)."""
    def events():
        for chunk in chunks:
            yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**headers, "x-request-id": request_id})


def chat_chunks(body: ChatRequest, n_prompt: int, completion: Completion,
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
        yield ChatChunk(**head, choices=[], usage=usage(n_prompt, completion.completion_tokens))


def completion_chunks(body: CompletionRequest, counts: list[int], answers: list[Completion],
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
        yield CompletionChunk(**head, choices=[], usage=usage(sum(counts), billed))
