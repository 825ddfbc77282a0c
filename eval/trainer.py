"""The built-in trainer: causal-LM fine-tuning on prompt/completion pairs with transformers' Trainer.

The loss covers completion tokens only; the prompt is context. Because it is the stock `Trainer`,
`accelerate launch` or `torchrun` scale the same code to many GPUs. It builds the reference teachers
and trains attack students.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

IGNORE = -100


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    max_length: int = 128
    log_every: int = 100
    output_dir: str = "runs/trainer"


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str],
                   max_length: int = 128) -> datasets.Dataset:
    """Token ids of prompt + completion + EOS, with labels masked on the prompt."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    rows = {"input_ids": [], "labels": []}
    for p, c in zip(prompt_ids, completion_ids):
        ids = (p + c + [tokenizer.eos_token_id])[:max_length]
        rows["input_ids"].append(ids)
        rows["labels"].append(([IGNORE] * len(p) + c + [tokenizer.eos_token_id])[:max_length])
    return datasets.Dataset.from_dict(rows)


class CompletionCollator:
    """Right-pads a batch to its longest row; padding is masked out of attention and loss."""

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
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class ThroughputCallback(TrainerCallback):
    """Adds completion tokens/s to the logs, so every run reports its speed."""

    def __init__(self):
        self.tokens = 0
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.start is not None:
            logs["tokens_per_s"] = round(self.tokens / max(time.perf_counter() - self.start, 1e-9), 1)


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
    losses: list[tuple[int, float]]
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: datasets.Dataset,
          config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train `model` in place on a tokenized dataset (see `tokenize_pairs`) for `config.steps` steps."""
    meter = ThroughputCallback()
    epochs = math.ceil(config.steps * config.batch_size / max(len(dataset), 1))
    args = TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size,
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
        remove_unused_columns=False,
        disable_tqdm=not progress,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=CountingCollator(tokenizer.pad_token_id, meter), callbacks=[meter])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    model.eval()
    return TrainResult(losses=losses, seconds=seconds, tokens=meter.tokens)
