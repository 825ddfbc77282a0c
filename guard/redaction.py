"""Reasoning-trace redaction: a Defense that decides how much of a teacher's reasoning a client sees.

    Redact(teacher, AnswerOnly())          # o-series style: the answer, no reasoning
    Redact(teacher, Summary())             # the plan, without the intermediate facts
    Redact(teacher, Truncate(8))           # the first 8 words of reasoning
    Redact(teacher, Sealed(Sealer.from_env()))  # the answer, plus the reasoning as an encrypted blob

Reasoning is found by `delimit` (``<think>``, ``####`` or an ``answer:`` line), and every policy but `Full`
fails closed: a completion whose reasoning cannot be delimited is all reasoning. That is one cut short by
`max_tokens` before its marker (a harvester's way to read the reasoning under any policy), and, when the served
model marks its reasoning (`marked`, the default), one with no marker at all; an unclosed ``<think>`` hides
everything after it. A rewritten completion carries no token ids or logprobs: those would spell out what was
withheld.

Truncation counts words (whitespace-separated tokens), not a tokenizer's pieces, so one policy means
the same thing on every backend, HTTP ones included.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guard.prompts import transcript
from guard.reasoning import delimit, join_reasoning
from guard.teacher import GREEDY, Caller, Completion, Defense, Sampling, Teacher

WORD = re.compile(r"\S+")
SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
Summarize = Callable[[list[str], list[str]], list[str]]  # (prompts, reasonings) -> summaries


@dataclass
class Redacted:
    text: str
    sealed: str | None = None


class Policy:
    """What a client sees of each completion. `streams` says whether text may go out as it is generated;
    `marked` whether the served model always marks where its reasoning ends, so that its unmarked text is
    reasoning (a plain chat model that marks nothing is served with `marked = False`: its finished, unmarked
    text is answer). `cut` says, per completion, whether it was cut short by `max_tokens`."""

    name = "policy"
    streams = False
    marked = True

    def redact(self, prompts: list[str], texts: list[str], cut: Sequence[bool] | None = None) -> list[Redacted]:
        return [self.redact_one(p, t, c) for p, t, c in zip(prompts, texts, cut or [False] * len(texts))]

    def redact_one(self, prompt: str, text: str, cut: bool = False) -> Redacted:
        raise NotImplementedError

    def split(self, text: str, cut: bool) -> tuple[str | None, str]:
        return delimit(text, cut, self.marked)


class Full(Policy):
    """Nothing hidden."""

    name, streams = "full", True

    def redact_one(self, prompt: str, text: str, cut: bool = False) -> Redacted:
        return Redacted(text)


class AnswerOnly(Policy):
    name = "answer-only"

    def redact_one(self, prompt: str, text: str, cut: bool = False) -> Redacted:
        reasoning, answer = self.split(text, cut)
        return Redacted(text if reasoning is None else join_reasoning(text, None, answer))


class Truncate(Policy):
    """The first `words` words of the reasoning, then an ellipsis, then the answer."""

    def __init__(self, words: int):
        if words < 1:
            raise ValueError(f"truncate needs a positive word count, got {words}")
        self.words, self.name = words, f"truncate:{words}"

    def redact_one(self, prompt: str, text: str, cut: bool = False) -> Redacted:
        reasoning, answer = self.split(text, cut)
        if reasoning is None:
            return Redacted(text)
        words = list(WORD.finditer(reasoning))
        shown = reasoning[: words[self.words - 1].end()] + " …" if len(words) > self.words else reasoning
        return Redacted(join_reasoning(text, shown, answer))


def outline(prompts: list[str], reasonings: list[str]) -> list[str]:
    """The fallback summary when no summariser knows the task: how much reasoning there was, nothing of it."""
    return [f"(reasoned in {max(1, len(SENTENCE_END.findall(r)))} steps; details withheld)" for r in reasonings]


class TeacherSummarizer:
    """Summaries written by a model (any Teacher), for tasks without a template."""

    INSTRUCTION = ("Summarise the plan of the reasoning below in one sentence. Do not state any "
                   "intermediate result or the final answer.\n\nQuestion: {prompt}\nReasoning: {reasoning}\n")

    def __init__(self, teacher: Teacher, instruction: str = INSTRUCTION, sampling: Sampling = GREEDY):
        self.teacher, self.instruction, self.sampling = teacher, instruction, sampling

    def __call__(self, prompts: list[str], reasonings: list[str]) -> list[str]:
        asks = [self.instruction.format(prompt=p.strip(), reasoning=r) for p, r in zip(prompts, reasonings)]
        return [c.answer.strip() for c in self.teacher.complete(asks, self.sampling)]


class Summary(Policy):
    """A summary of the reasoning in place of the reasoning, written by `summarize`: a task's own
    summariser, a `TeacherSummarizer`, or by default an `outline` that tells nothing of the content."""

    name = "summary"

    def __init__(self, summarize: Summarize = outline):
        self.summarize = summarize

    def redact(self, prompts: list[str], texts: list[str], cut: Sequence[bool] | None = None) -> list[Redacted]:
        splits = [self.split(t, c) for t, c in zip(texts, cut or [False] * len(texts))]
        todo = [i for i, (reasoning, _) in enumerate(splits) if reasoning]
        summaries = dict(zip(todo, self.summarize([prompts[i] for i in todo], [splits[i][0] for i in todo])))
        return [Redacted(t if reasoning is None else join_reasoning(t, summaries.get(i), answer))
                for i, (t, (reasoning, answer)) in enumerate(zip(texts, splits))]

    def redact_one(self, prompt: str, text: str, cut: bool = False) -> Redacted:
        return self.redact([prompt], [text], [cut])[0]


class SealError(ValueError):
    """A sealed blob failed to open. The message never includes the key."""


class Sealer:
    """Authenticated encryption (AES-256-GCM) of reasoning, bound to the prompt it answered (a conversation's
    every turn: `transcript`).

    Only the holder of the key can read a blob, and a blob altered by one bit, opened under another key,
    or handed back with another prompt is refused, so a client can return it in a later turn.
    """

    PREFIX = "dgs1."
    ENV = "DISTILL_GUARD_SEAL_KEY"

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError(f"a seal key is 32 bytes (AES-256), got {len(key)}")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "Sealer(key=<hidden>)"

    @classmethod
    def generate(cls) -> Sealer:
        return cls(AESGCM.generate_key(bit_length=256))

    @staticmethod
    def new_key() -> str:
        """A fresh key, base64url-encoded, for DISTILL_GUARD_SEAL_KEY."""
        return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode()

    @classmethod
    def from_env(cls, required: bool = False) -> Sealer:
        """The key in $DISTILL_GUARD_SEAL_KEY; without it, a random key that dies with the process."""
        value = os.environ.get(cls.ENV)
        if not value:
            if required:
                raise SealError(f"set {cls.ENV} to a base64url 32-byte key (make one with Sealer.new_key())")
            return cls.generate()
        try:
            return cls(base64.urlsafe_b64decode(value.encode()))
        except (binascii.Error, ValueError):
            raise SealError(f"{cls.ENV} is not a base64url-encoded 32-byte key") from None

    def seal(self, reasoning: str, prompt: str = "") -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, reasoning.encode(), transcript(prompt).encode())
        return self.PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, blob: str, prompt: str = "") -> str:
        if not blob.startswith(self.PREFIX):
            raise SealError("not a sealed-reasoning blob (expected the 'dgs1.' prefix)")
        try:
            raw = base64.urlsafe_b64decode(blob[len(self.PREFIX):].encode())
        except (binascii.Error, ValueError):
            raise SealError("sealed-reasoning blob is not valid base64url") from None
        if len(raw) < 12 + 16:
            raise SealError("sealed-reasoning blob is truncated")
        try:
            return self._aead.decrypt(raw[:12], raw[12:], transcript(prompt).encode()).decode()
        except InvalidTag:
            raise SealError("sealed reasoning failed authentication: it was altered, sealed under another key, "
                            "or handed back in a different conversation") from None


class Sealed(Policy):
    """The answer in clear; the reasoning only as a blob that the provider's key opens."""

    name = "sealed"

    def __init__(self, sealer: Sealer | None = None):
        self.sealer = sealer or Sealer.from_env()

    def redact_one(self, prompt: str, text: str, cut: bool = False) -> Redacted:
        reasoning, answer = self.split(text, cut)
        if reasoning is None:
            return Redacted(text)
        return Redacted(join_reasoning(text, None, answer), sealed=self.sealer.seal(reasoning, prompt))


NOT_ANSWERED = ("refused", "context_length")  # nothing was generated, so there is nothing to redact
POLICIES = ("full", "answer-only", "summary", "truncate:K", "sealed")


def parse_policy(spec: str, summarize: Summarize | None = None, sealer: Sealer | None = None,
                 marked: bool = True) -> Policy:
    """A policy from its command-line name: full, answer-only, summary, truncate:K, sealed. `summarize`
    writes summaries (default `outline`); `sealer` holds the sealing key (default $DISTILL_GUARD_SEAL_KEY);
    `marked`: whether the served model marks its reasoning (see `Policy`)."""
    policy = _parse_policy(spec, summarize, sealer)
    policy.marked = marked
    return policy


def _parse_policy(spec: str, summarize: Summarize | None, sealer: Sealer | None) -> Policy:
    if spec.startswith("truncate:"):
        words = spec.removeprefix("truncate:")
        if not words.isdigit() or int(words) < 1:
            raise ValueError(f"truncate:K needs a positive whole number of words, got {spec!r}")
        return Truncate(int(words))
    if spec == "summary":
        return Summary(summarize or outline)
    if spec == "sealed":
        return Sealed(sealer)
    policies = {"full": Full, "answer-only": AnswerOnly}
    if spec not in policies:
        raise ValueError(f"unknown redaction policy {spec!r}; choose one of {list(POLICIES)}")
    return policies[spec]()


def redact_completions(policy: Policy, prompts: list[str], completions: list[Completion]) -> list[Completion]:
    """`completions` as `policy` serves them: a rewritten one keeps its finish reason and token count (hidden
    tokens are still billed) and names the policy in its decisions."""
    out = []
    cut = [c.finish_reason == "length" for c in completions]
    for c, r in zip(completions, policy.redact(prompts, [c.text for c in completions], cut)):
        if (r.text == c.text and r.sealed is None) or c.finish_reason in NOT_ANSWERED:
            out.append(c)
        else:
            out.append(Completion(text=r.text, finish_reason=c.finish_reason, sealed_reasoning=r.sealed,
                                  completion_tokens=c.completion_tokens, prompt_tokens=c.prompt_tokens,
                                  decisions={**c.decisions, "redaction": policy.name}))
    return out


class Redact(Defense):
    """A teacher as served under a redaction policy. It is itself a Teacher, so defences compose."""

    def __init__(self, teacher: Teacher, policy: Policy):
        super().__init__(teacher)
        self.policy = policy
        self.name = f"{teacher.name}+{policy.name}"

    def complete(self, prompts: list[str], sampling: Sampling = Sampling(),
                 callers: Sequence[Caller] | None = None) -> list[Completion]:
        return redact_completions(self.policy, prompts, self.teacher.complete(prompts, sampling, callers))

    def stream(self, prompt: str) -> StreamRedactor:
        return StreamRedactor(self.policy, prompt)


class StreamRedactor:
    """Redaction of one streamed completion, decided chunk by chunk.

    A policy that may withhold reasoning cannot know, mid-stream, where the reasoning ends (an ``answer:``
    line or ``</think>`` may still come), so it emits nothing until the completion ends. Only `Full`
    streams. Nothing emitted is ever taken back.
    """

    def __init__(self, policy: Policy, prompt: str):
        self.policy, self.prompt = policy, prompt
        self.text, self.emitted, self.sealed = "", "", None

    def feed(self, chunk: str) -> str:
        self.text += chunk
        return self._emit(self.text) if self.policy.streams else ""

    def finish(self, cut: bool = False) -> str:
        """The rest of the text, once the completion has ended; `cut`: it ended at `max_tokens`."""
        final = self.policy.redact([self.prompt], [self.text], [cut])[0]
        if not final.text.startswith(self.emitted):
            raise RuntimeError(f"policy {self.policy.name} took back streamed text")  # a bug in the policy
        self.sealed = final.sealed
        return self._emit(final.text)

    def _emit(self, text: str) -> str:
        out, self.emitted = text[len(self.emitted):], text
        return out
