"""Teachers: anything that completes prompts. Here: the vocabulary and the `Defense` protocol, with no model
library behind them (a gateway in front of an upstream URL needs no torch); the local Hugging Face backend is
`guard.hf_teacher.HFTeacher`.

A `Teacher` has one method, `complete(prompts, sampling, callers) -> list[Completion]`. Each prompt comes
from a `Caller` (the account behind it, and when and from where it asked). A `Defense` wraps a teacher and
is one itself, so the code that serves a defended teacher is the code that evaluates it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guard.reasoning import split_reasoning

if TYPE_CHECKING:  # names in annotations only: importing transformers would load torch
    from transformers import PreTrainedTokenizerBase

@dataclass
class TokenLogprob:
    token: str
    logprob: float
    id: int | None = None


@dataclass
class Completion:
    """One answer: its text, the reasoning/answer split, the token ids and optional top-k logprobs."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[TokenLogprob]] | None = None  # per generated token, the top-k alternatives
    token_logprobs: list[TokenLogprob] | None = None  # per generated token, the sampled token itself
    finish_reason: str = "stop"
    reasoning: str | None = None
    answer: str = ""
    sealed_reasoning: str | None = None  # reasoning withheld by a `Sealed` redaction, encrypted for the provider
    completion_tokens: int | None = None  # tokens generated (and billed), hidden ones included; default len(token_ids)
    prompt_tokens: int | None = None  # the prompt's tokens as the backend counted them, where it reports them
    decisions: dict[str, str] = field(default_factory=dict)  # what each defence decided for it, and why

    def __post_init__(self):
        if self.completion_tokens is None:
            self.completion_tokens = len(self.token_ids)
        if not self.answer:
            self.reasoning, self.answer = split_reasoning(self.text)


@dataclass
class Sampling:
    """Decoding settings. temperature=0 means greedy; logprobs=k asks for the top-k per token."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    seed: int | None = None
    logprobs: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


GREEDY = Sampling(temperature=0.0)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the account a defence acts for, and when and from where it asked.

    The gateway resolves an API key to the account; an experiment plays one or many accounts on its own
    clock. `time` is seconds since the epoch; None means now.
    """

    account: str = "anonymous"
    time: float | None = None
    ip: str | None = None
    payment: str | None = None  # a payment fingerprint, for linking accounts


ANONYMOUS = Caller()
# The request header in which a lab client sends its caller's simulated time (seconds since the epoch). Only a
# gateway started for the lab (`create_app(lab_clock=True)`, `gateway --lab`) honours it; any other ignores it,
# so no client can choose the time a production monitor judges it at.
LAB_TIME_HEADER = "x-distill-guard-lab-time"


def callers_for(prompts: list[str], callers: Sequence[Caller] | None) -> list[Caller]:
    """One caller per prompt: `callers` checked, or the anonymous caller for each."""
    if callers is None:
        return [ANONYMOUS] * len(prompts)
    if len(callers) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(callers)} callers: give one caller per prompt")
    return list(callers)


class Teacher:
    """Completes a batch of prompts, each sent by its caller. Subclasses implement `complete`.

    A plain teacher answers everyone alike and remembers no one: `fresh()` is the teacher itself.
    """

    name: str = "teacher"
    remembers_callers = False  # whether one request's answer can depend on the caller's earlier requests
    concurrent = False  # whether `complete` may run in many threads at once (a remote backend's HTTP calls)
    tokenizer: PreTrainedTokenizerBase | None = None  # a local model's own; None where the backend is remote
    context_length: int | None = None  # the most tokens (prompt and completion) the model attends to, if known

    def complete(self, prompts: list[str], sampling: Sampling = Sampling(),
                 callers: Sequence[Caller] | None = None) -> list[Completion]:
        raise NotImplementedError

    def fresh(self) -> Teacher:
        """The same deployment with no memory of earlier callers (a new attack replicate starts here)."""
        return self

    def observe(self, prompts: list[str], callers: Sequence[Caller]) -> None:
        """Requests turned away before generation (a prompt over the model's context): still their callers'
        traffic, which a defence that keeps history counts as a local teacher's caller would have it counted.
        A plain teacher has nothing to record."""


class Defense(Teacher):
    """A teacher that wraps a teacher and acts per caller: `Redact(Watermark(teacher))`.

    Serving: every prompt reaches `complete` with its `Caller`, so a defence can act per account (a
    watermark key, a monitor verdict, a redaction tier). Evaluation: `fresh()` rebuilds the deployment,
    inner defences included, with no memory of earlier callers, so no state leaks between attack replicates.
    A defence whose decisions depend on a caller's history (a traffic monitor) sets `keeps_history`; then the
    whole stack `remembers_callers`, and its cost to benign users is measured by replaying benign traffic
    through it.
    """

    keeps_history = False

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    @property
    def remembers_callers(self) -> bool:
        return self.keeps_history or self.teacher.remembers_callers

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.teacher.tokenizer

    @property
    def concurrent(self) -> bool:  # a defence keeping shared state guards it with a lock (`Monitored`)
        return self.teacher.concurrent

    @property
    def context_length(self) -> int | None:
        return self.teacher.context_length

    def fresh(self) -> Defense:
        clone = copy.copy(self)
        clone.teacher = self.teacher.fresh()
        return clone

    def observe(self, prompts: list[str], callers: Sequence[Caller]) -> None:
        self.teacher.observe(prompts, callers)


class ModelLoadError(ValueError):
    """A checkpoint cannot be loaded safely; the message says why and what to do."""
