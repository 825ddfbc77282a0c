"""Measures, defined once: capability (greedy accuracy on held-out items) and response entropy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta

from eval.task import Item, Task
from guard.hf_teacher import HFTeacher
from guard.prompts import prompt_ids
from guard.teacher import Completion, Sampling, Teacher


class MostlyRefused(ValueError):
    """Most evaluation items were never answered: their prompt and the answer's length exceed the model's
    context. An accuracy of them would be a silent zero."""


@dataclass
class Accuracy:
    per_item: np.ndarray  # bool, one flag per graded item
    refused: int = 0  # items the model never answered (prompt plus max_new_tokens past its context): graded wrong

    @property
    def correct(self) -> int:
        return int(self.per_item.sum())

    @property
    def total(self) -> int:
        return len(self.per_item)

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def clopper_pearson(self, confidence: float = 0.95) -> tuple[float, float]:
        """Exact two-sided binomial interval for the accuracy."""
        a = (1 - confidence) / 2
        low = beta.ppf(a, self.correct, self.total - self.correct + 1) if self.correct else 0.0
        high = beta.ppf(1 - a, self.correct + 1, self.total - self.correct) if self.correct < self.total else 1.0
        return float(low), float(high)


def capability(teacher: Teacher, task: Task, items: list[Item] | None = None) -> tuple[Accuracy, list[Completion]]:
    """The task's grader over `items` (default: the held-out evaluation items), greedy decoding of up to
    `task.max_new_tokens`. An item refused for its length is graded wrong and counted (`Accuracy.refused`); when
    most are, `MostlyRefused` says so rather than return a silent zero."""
    items = task.eval_items if items is None else items
    completions = teacher.complete([i.prompt for i in items],
                                   Sampling(temperature=0.0, max_new_tokens=task.max_new_tokens))
    per_item = np.array([task.is_correct(c.text, i.answer) for c, i in zip(completions, items)], dtype=bool)
    refused = sum(c.finish_reason == "context_length" for c in completions)
    if items and refused > len(items) / 2:
        context = getattr(teacher, "context_length", None)
        raise MostlyRefused(f"{teacher.name}: {refused} of {len(items)} evaluation items were refused: each prompt "
                            f"plus max_new_tokens={task.max_new_tokens} exceeds the model's context"
                            f"{f' of {context} positions' if context else ''}; lower --max-new-tokens")
    return Accuracy(per_item, refused), completions


@torch.no_grad()
def response_entropy_bits(teacher: HFTeacher, prompts: list[str], seed: int = 0, temperature: float = 1.0,
                          max_new_tokens: int = 64) -> np.ndarray:
    """Summed per-token entropy (bits) of each sampled response, the end-of-text decision included.

    By the chain rule its mean over samples estimates the entropy of the whole response distribution.
    """
    model, tok = teacher.model, teacher.tokenizer
    totals = []
    for start in range(0, len(prompts), teacher.batch_size):
        torch.manual_seed(seed + start)
        batch = tok.pad({"input_ids": prompt_ids(tok, prompts[start:start + teacher.batch_size])}, return_tensors="pt",
                        padding_side="left").to(teacher.device)
        out = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, return_dict_in_generate=True, output_logits=True)
        logp = (torch.stack(out.logits, dim=1).float() / temperature).log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1) / np.log(2)  # (batch, steps), bits
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        # Count each step up to and including the first end-of-text; later steps are padding.
        ended_before = (new == tok.eos_token_id).int().cumsum(1) - (new == tok.eos_token_id).int()
        totals += (entropy * (ended_before == 0)).sum(1).tolist()
    return np.array(totals)
