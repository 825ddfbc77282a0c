"""The OpenAI wire schema: the requests the gateway takes and the responses and stream chunks it sends, field for
field as OpenAI's (and vLLM's) API has them, so that the `openai` SDK and any vLLM client work unchanged.
`sealed_reasoning` is this gateway's one addition: withheld reasoning, encrypted, that a client may hand back."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from guard.gateway.errors import APIError
from guard.teacher import Sampling

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


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
