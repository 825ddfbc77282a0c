"""The local Hugging Face backend: any causal LM `AutoModelForCausalLM` loads from safetensors, as a `Teacher`.
Kept apart from `guard.teacher`'s vocabulary so that what needs no model (a gateway in front of an upstream URL)
imports no torch."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList, PreTrainedModel,
                          PreTrainedTokenizerBase)

from guard.prompts import prompt_format, prompt_ids, uses_chat
from guard.teacher import Caller, Completion, ModelLoadError, Sampling, Teacher, TokenLogprob, callers_for

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


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
