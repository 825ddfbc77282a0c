"""The built-in trainer: causal-LM fine-tuning on prompt/completion pairs with transformers' Trainer.

The loss covers completion tokens only; the prompt is context. Rows may carry a loss weight (for
multi-task distillation) and the teacher's top-k logprobs per completion token (for logit distillation,
with the leftover probability mass as one tail bucket). Because it is the stock `Trainer`, `torchrun` (or
`accelerate launch --multi_gpu`) runs the same code as data-parallel ranks, on CPUs (gloo) or GPUs (nccl);
`batch_size` is the batch of one optimiser step, split over the ranks. It builds the reference teachers and
trains attack students.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from guard.prompts import pair_ids

IGNORE = -100


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # rows per optimiser step, over all processes together
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    max_length: int = 128
    log_every: int = 100
    output_dir: str = "runs/trainer"
    kd_loss: str = "forward_kl"


def world_size() -> int:
    """Processes training together: torchrun (and `accelerate launch`, which runs it) sets WORLD_SIZE in each."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_device_batch(batch_size: int) -> int:
    """One process's share of a batch. The ranks split each batch rather than each taking a whole one, so a step
    sees the same rows (and the same learning rate suits it) on one process or many."""
    processes = world_size()
    if batch_size % processes:
        raise ValueError(f"batch size {batch_size} does not split evenly over {processes} processes: use a "
                         f"multiple of {processes}")
    return batch_size // processes


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str],
                   max_length: int = 128) -> datasets.Dataset:
    """Token ids of prompt + completion + EOS (the prompt formatted as `guard.prompts` formats it for the model),
    with labels masked on the prompt."""
    sequences, prompt_lengths = pair_ids(tokenizer, prompts, completions, end=True)
    rows = {"input_ids": [], "labels": []}
    for ids, n in zip(sequences, prompt_lengths):
        rows["input_ids"].append(ids[:max_length])
        rows["labels"].append(([IGNORE] * n + ids[n:])[:max_length])
    return datasets.Dataset.from_dict(rows)


class CompletionCollator:
    """Right-pads a batch to its longest row; padding is masked out of attention and loss.

    Optional row fields: `weight` (a float), and `kd_ids` / `kd_logprobs` (one top-k list per
    completion token, aligned with the completion's labels).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if "weight" in rows[0]:
            batch["weights"] = torch.tensor([r["weight"] for r in rows], dtype=torch.float)
        if "kd_ids" in rows[0]:
            k = max((len(step) for r in rows for step in r["kd_ids"]), default=1)
            batch["kd_ids"] = torch.zeros((len(rows), width, k), dtype=torch.long)
            batch["kd_logprobs"] = torch.full((len(rows), width, k), float("-inf"))
            batch["kd_mask"] = torch.zeros((len(rows), width), dtype=torch.bool)
            for i, r in enumerate(rows):
                start = next((j for j, x in enumerate(r["labels"]) if x != IGNORE), 0)
                for t, (step_ids, step_lp) in enumerate(zip(r["kd_ids"], r["kd_logprobs"])):
                    if start + t >= width or not step_ids:
                        break
                    batch["kd_ids"][i, start + t, : len(step_ids)] = torch.tensor(step_ids)
                    batch["kd_logprobs"][i, start + t, : len(step_lp)] = torch.tensor(step_lp)
                    batch["kd_mask"][i, start + t] = True
        return batch


def topk_distillation_loss(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                           kind: str = "forward_kl") -> torch.Tensor:
    """Per-position divergence between teacher and student over the teacher's top-k tokens plus a tail.

    The teacher's known mass is its top-k probabilities; whatever they leave (1 - sum) is one tail bucket,
    and the student's distribution is folded the same way, as TRL's server-side distillation does.

    Args:
        student_logits: (..., vocab) raw logits.
        top_ids: (..., k) teacher top-k token ids; unused slots have logprob -inf.
        top_logprobs: (..., k) teacher log-probabilities of those ids.
        kind: "forward_kl" (KL(teacher || student)) or "jsd" (Jensen-Shannon, base e).
    Returns:
        (...) divergence per position, in nats.
    """
    eps = 1e-8
    p_top = top_logprobs.exp()
    p = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
    q_top = student_logits.float().log_softmax(-1).gather(-1, top_ids).exp() * (p_top > 0)
    q = torch.cat([q_top, (1 - q_top.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
    if kind == "forward_kl":
        return (p * ((p + eps).log() - (q + eps).log())).sum(-1)
    if kind == "jsd":
        m = (p + q) / 2
        kl_pm = (p * ((p + eps).log() - (m + eps).log())).sum(-1)
        kl_qm = (q * ((q + eps).log() - (m + eps).log())).sum(-1)
        return (kl_pm + kl_qm) / 2
    raise ValueError(f"unknown distillation loss {kind!r}; use 'forward_kl' or 'jsd'")


class DistillTrainer(Trainer):
    """Trainer whose loss understands per-row weights and top-k teacher targets; plain rows take the stock loss."""

    kd_loss: str = "forward_kl"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "weights" not in inputs and "kd_ids" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        weights = inputs.pop("weights", None)
        kd_ids, kd_logprobs, kd_mask = (inputs.pop(k, None) for k in ("kd_ids", "kd_logprobs", "kd_mask"))
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits, targets = outputs.logits[:, :-1], labels[:, 1:]
        token_mask = targets != IGNORE
        per_token = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
        if kd_ids is not None:
            divergence = topk_distillation_loss(logits, kd_ids[:, 1:], kd_logprobs[:, 1:], self.kd_loss)
            per_token = torch.where(kd_mask[:, 1:], divergence, per_token)
        row_weight = weights if weights is not None else torch.ones(len(labels), device=labels.device)
        weighted = row_weight[:, None] * token_mask
        total = weighted.sum()
        if self.accelerator.num_processes > 1:  # normalise by the whole batch's weight, as one process does (the
            # ranks' gradients are then averaged, hence the division)
            total = self.accelerator.reduce(total.detach(), reduction="sum") / self.accelerator.num_processes
        loss = (per_token * weighted).sum() / total.clamp(min=1e-8)
        return (loss, outputs) if return_outputs else loss


class ThroughputCallback(TrainerCallback):
    """Adds completion tokens/s to the logs, so every run reports its speed."""

    def __init__(self):
        self.tokens = 0
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.start is not None:
            # each rank counts only its own tokens, and every rank takes an equal share of each batch
            tokens = self.tokens * args.world_size
            logs["tokens_per_s"] = round(tokens / max(time.perf_counter() - self.start, 1e-9), 1)


class CountingCollator(CompletionCollator):
    def __init__(self, pad_token_id: int, meter: ThroughputCallback):
        super().__init__(pad_token_id)
        self.meter = meter

    def __call__(self, rows):
        batch = super().__call__(rows)
        self.meter.tokens += int(batch["attention_mask"].sum())
        return batch


@dataclass
class TrainResult:
    losses: list[tuple[int, float]]  # (step, mean loss since the last log), averaged over the ranks
    seconds: float
    tokens: int  # over all ranks

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: datasets.Dataset,
          config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train `model` in place on a tokenized dataset (see `tokenize_pairs`) for `config.steps` steps.

    Under torchrun every rank calls this with the same model, data and config: each step's batch is split over
    them (`per_device_batch`), and the seeded sampler gives every rank the same order to take its share from."""
    meter = ThroughputCallback()
    epochs = math.ceil(config.steps * config.batch_size / max(len(dataset), 1))
    args = TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=per_device_batch(config.batch_size),
        # without a GPU, transformers distributes only when told to use the CPU; else each rank trains alone
        use_cpu=world_size() > 1 and not torch.cuda.is_available(),
        max_steps=config.steps,
        num_train_epochs=epochs,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        logging_steps=config.log_every,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=not progress,
    )
    trainer = DistillTrainer(model=model, args=args, train_dataset=dataset,
                             data_collator=CountingCollator(tokenizer.pad_token_id, meter), callbacks=[meter])
    trainer.kd_loss = config.kd_loss
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = trainer.accelerator.reduce(torch.tensor(meter.tokens, device=args.device), reduction="sum")
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    model.eval()
    return TrainResult(losses=losses, seconds=seconds, tokens=int(tokens))
