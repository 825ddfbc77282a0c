"""Teachers: anything that completes prompts. Here: the vocabulary, the `Defense` protocol and the local
Hugging Face backend.

A `Teacher` has one method, `complete(prompts, sampling, callers) -> list[Completion]`. Each prompt comes
from a `Caller` (the account behind it, and when and from where it asked). A `Defense` wraps a teacher and
is one itself, so the code that serves a defended teacher is the code that evaluates it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList, PreTrainedModel,
                          PreTrainedTokenizerBase)

from guard.prompts import prompt_format, prompt_ids, uses_chat
from guard.reasoning import split_reasoning

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


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


def load_causal_lm(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local causal LM and its tokenizer, treating the checkpoint as untrusted.

    Only safetensors weights are read (pickle can run code on load), remote code is never trusted,
    and nothing is downloaded.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a model directory (models are loaded from local paths only)")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_SUFFIXES)
        if pickled:
            raise ModelLoadError(
                f"{path}: refusing pickled weights {pickled}; pickle can execute code on load. "
                "Convert the checkpoint to safetensors in a sandbox you trust, then load that.")
        raise ModelLoadError(f"{path}: no *.safetensors weights found")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, use_safetensors=True,
                                                     trust_remote_code=False, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"{path}: cannot load as a causal LM: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


class _MaskWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "attention_mask" not in record.getMessage()


@contextmanager
def _no_spurious_mask_warning():
    """`generate` gets our attention mask, then checks its own decoding steps for one and warns that the mask
    is missing whenever a row's last token is the pad token (here also end-of-text). The warning is false for
    our calls, so it is silenced for them alone."""
    logger, quiet = logging.getLogger("transformers.modeling_utils"), _MaskWarningFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class HFTeacher(Teacher):
    """A local causal LM: any architecture `AutoModelForCausalLM` loads from safetensors.

    Args:
        path: model directory with safetensors weights, config and tokenizer.
        batch_size: prompts per `generate` call.
        device: torch device; defaults to CUDA when available.
        chat: format prompts with the tokenizer's chat template (`guard.prompts`). None: when it has one (an
            instruct model); False: raw text with the tokenizer's own special tokens (a base model, the lab).

    Example:
        >>> teacher = HFTeacher("eval/reference/models/teacher-a")
        >>> teacher.complete(["question: where does Kalon live?\\n"], GREEDY)[0].answer
    """

    def __init__(self, path: str | Path, batch_size: int = 128, device: str | None = None,
                 model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 chat: bool | None = None):
        if model is None or tokenizer is None:
            model, tokenizer = load_causal_lm(path)
        if chat and not uses_chat(tokenizer):
            raise ValueError(f"{path}: chat prompting asked for, but its tokenizer has no chat template")
        if chat is False and uses_chat(tokenizer):
            tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its template
            tokenizer.chat_template = None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format(tokenizer)  # "chat" or "raw", recorded in every harvest's manifest
        self.batch_size = batch_size
        self.name = Path(path).name

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt and completion) the model attends to, if its config says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def complete(self, prompts: list[str], sampling: Sampling = Sampling(), callers: Sequence[Caller] | None = None,
                 logits_processor: LogitsProcessorList | None = None) -> list[Completion]:
        """`logits_processor`: token-level defences (e.g. a watermark) applied inside `generate`.

        A prompt whose tokens plus `max_new_tokens` exceed the model's context is not generated: its
        completion is empty with finish_reason "context_length" (a server answers 400 before it gets here).
        """
        callers_for(prompts, callers)
        encoded = prompt_ids(self.tokenizer, prompts)
        limit = self.context_length
        fits = [i for i, ids in enumerate(encoded) if limit is None or len(ids) + sampling.max_new_tokens <= limit]
        completions: list[Completion] = [Completion(text="", finish_reason="context_length") for _ in prompts]
        for start in range(0, len(fits), self.batch_size):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed + start)
            rows = fits[start:start + self.batch_size]
            for i, completion in zip(rows, self._generate([encoded[i] for i in rows], sampling, logits_processor)):
                completions[i] = completion
        return completions

    def _generate(self, encoded: list[list[int]], sampling: Sampling,
                  logits_processor: LogitsProcessorList | None = None) -> list[Completion]:
        tok = self.tokenizer
        batch = tok.pad({"input_ids": encoded}, return_tensors="pt", padding_side="left").to(self.device)
        sample = sampling.temperature > 0
        with _no_spurious_mask_warning():
            out = self.model.generate(
                **batch,
                do_sample=sample,
                temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None,
                top_k=sampling.top_k if sample else None,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                return_dict_in_generate=True,
                output_logits=sampling.logprobs > 0,
                logits_processor=logits_processor,
            )
        prompt_length = batch["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_length:].tolist()
        if sampling.logprobs > 0:
            # Model logits before temperature or truncation: the distribution itself, as OpenAI reports it;
            # with token-level defences applied, so reported numbers never bypass a watermark.
            steps = [logits if logits_processor is None else logits_processor(out.sequences[:, :prompt_length + s], logits)
                     for s, logits in enumerate(out.logits)]
            logprobs = torch.stack(steps, dim=1).float().log_softmax(-1)
            top = logprobs.topk(sampling.logprobs, dim=-1)
        completions = []
        for row, ids in enumerate(new_tokens):
            finish = "length"
            if tok.eos_token_id in ids:
                ids, finish = ids[: ids.index(tok.eos_token_id)], "stop"
            per_token = chosen = None
            if sampling.logprobs > 0:
                values, indices = top.values[row, : len(ids)].tolist(), top.indices[row, : len(ids)].tolist()
                names = tok.batch_decode([[i] for step in indices for i in step] + [[i] for i in ids])
                per_token = [[TokenLogprob(names[s * sampling.logprobs + k], v, i)
                              for k, (v, i) in enumerate(zip(vs, js))]
                             for s, (vs, js) in enumerate(zip(values, indices))]
                sampled = logprobs[row, torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)].tolist()
                chosen = [TokenLogprob(name, v, i) for name, v, i in zip(names[-len(ids):] if ids else [], sampled, ids)]
            completions.append(Completion(text=tok.decode(ids, skip_special_tokens=True), token_ids=ids,
                                          logprobs=per_token, token_logprobs=chosen, finish_reason=finish))
        return completions
