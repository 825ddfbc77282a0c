"""Students: a model that starts from a config or a pretrained path and learns from a harvest.

Modes (what the attacker trains on):
- ``sft``: every visible completion token (sequence-level distillation, Alpaca / R1-distill style);
- ``answer``: the final answers only, reasoning stripped (what an answer-only API leaves);
- ``rationale``: distilling step-by-step, a multi-task loss: the prompt plus a rationale tag predicts the
  reasoning (weight α), the bare prompt predicts the answer (weight 1 - α);
- ``kd``: logit distillation on the teacher's top-k logprobs where they were exposed.

Under torchrun a command runs inside `lead_training`: rank 0 does all of its work, and the other ranks join in
training each student it trains (data parallel), so harvests, grading and files happen once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import datasets
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from eval.reference import MODELS_DIR
from eval.trainer import IGNORE, TrainConfig, TrainResult, per_device_batch, tokenize_pairs, train, world_size
from guard.hf_teacher import load_causal_lm
from guard.prompts import prompt_ids, text_ids
from guard.reasoning import split_reasoning, strip_reasoning

MODES = ("sft", "answer", "rationale", "kd")
RATIONALE_TAG = "explain: "


@dataclass
class StudentConfig:
    mode: str = "sft"
    init: str = "reference"  # "reference", a config-only directory, or a pretrained model directory
    steps: int | None = None  # None: scale with the data, see `auto_steps`
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    seed: int = 0
    alpha: float = 0.5  # rationale mode: weight of the rationale task
    kd_loss: str = "forward_kl"
    lora: bool = False
    lora_r: int = 8
    lora_targets: str | None = None  # peft's target_modules, e.g. "all-linear"; None: peft's default for the model

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown student mode {self.mode!r}; choose one of {MODES}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def auto_steps(rows: int) -> int:
    """About 32 passes over the harvest at batch 64, within [300, 2000] steps: enough passes for the reference
    lab's largest harvests to transfer most of the teacher's capability, and a cap that keeps one student
    within minutes on 2 CPU cores (the redaction grid's reports record transfer and train_seconds)."""
    return int(min(2000, max(300, rows // 2)))


def init_student(config: StudentConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh model from a config directory (seeded), or a pretrained one (optionally with LoRA adapters)."""
    path = Path(config.init)
    if config.init == "reference":
        path = MODELS_DIR / "student"
    if any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
        model, tokenizer = load_causal_lm(path)
    else:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: neither a model nor a config directory")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, trust_remote_code=False))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.lora:
        from peft import LoraConfig, get_peft_model  # heavy, and optional: only LoRA students load it

        targets = config.lora_targets.split(",") if config.lora_targets and config.lora_targets != "all-linear" \
            else config.lora_targets
        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0,
                                                 target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    return model, tokenizer


def training_set(rows: list[dict], mode: str, tokenizer: PreTrainedTokenizerBase, alpha: float = 0.5,
                 max_length: int = 128) -> datasets.Dataset:
    """Tokenized training rows for `mode` from harvest rows with `prompt` and `text` (and top-k for kd)."""
    prompts = [r["prompt"] for r in rows]
    if mode == "sft":
        return tokenize_pairs(tokenizer, prompts, [r["text"] for r in rows], max_length)
    if mode == "answer":
        return tokenize_pairs(tokenizer, prompts, [strip_reasoning(r["text"]) for r in rows], max_length)
    if mode == "rationale":
        rationale = tokenize_pairs(tokenizer, [RATIONALE_TAG + p for p in prompts],
                                   [split_reasoning(r["text"])[0] or "" for r in rows], max_length)
        label = tokenize_pairs(tokenizer, prompts, [strip_reasoning(r["text"]) for r in rows], max_length)
        rationale = rationale.add_column("weight", [alpha] * len(rationale))
        label = label.add_column("weight", [1 - alpha] * len(label))
        return datasets.concatenate_datasets([rationale, label])
    if mode == "kd":
        return kd_set(rows, tokenizer, max_length)
    raise ValueError(f"unknown student mode {mode!r}; choose one of {MODES}")


def kd_set(rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
    """Rows whose targets are the teacher's own tokens and top-k logprobs, in the student's vocabulary."""
    missing = sum(1 for r in rows if not r.get("top_logprobs"))
    if missing == len(rows):
        raise ValueError("kd mode needs top-k logprobs, and this harvest has none: harvest with --logprobs K "
                         "from a teacher that exposes them")
    out = {"input_ids": [], "labels": [], "kd_ids": [], "kd_logprobs": []}
    for r, prompt in zip(rows, prompt_ids(tokenizer, [r["prompt"] for r in rows])):
        completion_ids = list(r["token_ids"]) or text_ids(tokenizer, [r["text"]])[0]
        top_ids = [list(step) for step in r.get("top_ids") or []]
        top_logprobs = [list(step) for step in r.get("top_logprobs") or []]
        if top_ids and min(min(step) for step in top_ids) < 0:  # an HTTP teacher sent token strings
            top_ids, top_logprobs = _ids_from_strings(tokenizer, r["top_tokens"], top_logprobs)
        if len(top_ids) != len(completion_ids):  # not aligned with our tokens: plain cross-entropy for this row
            top_ids, top_logprobs = [], []
        ids = (prompt + completion_ids + [tokenizer.eos_token_id])[:max_length]
        out["input_ids"].append(ids)
        out["labels"].append(([IGNORE] * len(prompt) + completion_ids + [tokenizer.eos_token_id])[:max_length])
        out["kd_ids"].append(top_ids)
        out["kd_logprobs"].append(top_logprobs)
    return datasets.Dataset.from_dict(out)


def _ids_from_strings(tokenizer, top_tokens, top_logprobs):
    """Token ids for decoded token strings; a string that is not exactly one of our tokens is dropped."""
    ids_out, lps_out = [], []
    for tokens, lps in zip(top_tokens, top_logprobs):
        pairs = [(ids[0], lp) for t, lp in zip(tokens, lps)
                 if len(ids := tokenizer.encode(t, add_special_tokens=False)) == 1]
        ids_out.append([i for i, _ in pairs] or [tokenizer.eos_token_id])
        lps_out.append([lp for _, lp in pairs] or [float("-inf")])
    return ids_out, lps_out


def train_student(rows: list[dict], config: StudentConfig, output_dir: str = "runs/student",
                  progress: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, TrainResult]:
    """Initialise a student and distil it on harvest rows; LoRA adapters are merged before returning.

    Under torchrun, every rank calls this with the same rows (or rank 0 alone, inside `lead_training`)."""
    if not rows:
        raise ValueError("no training rows: the harvest holds no served completion to learn from")
    per_device_batch(config.batch_size)  # a batch that does not split over the ranks fails here, on rank 0
    model, tokenizer = init_student(config)
    dataset = training_set(rows, config.mode, tokenizer, config.alpha)
    if _followers is not None:  # every check that can fail has passed: the other ranks join in from here
        _broadcast((rows, config, output_dir, progress), _followers)
    steps = config.steps or auto_steps(len(rows))
    result = train(model, tokenizer, dataset, TrainConfig(
        steps=steps, batch_size=config.batch_size, lr=config.lr, warmup_steps=config.warmup_steps,
        seed=config.seed, log_every=max(1, min(100, steps // 10)), output_dir=output_dir,
        kd_loss=config.kd_loss), progress=progress)
    if config.lora:
        model = model.merge_and_unload()
    return model, tokenizer, result


T = TypeVar("T")
_followers = None  # on rank 0 inside `lead_training`: the channel that hands each student to the other ranks


def lead_training(command: Callable[[], T]) -> T | None:
    """Run `command` on rank 0 of a torchrun job while the other ranks train, alongside it, each student it
    trains (`train_student`); alone, just run it. Only training is spread over processes: harvests, grading
    and every file stay on rank 0. Returns what `command` returns, on rank 0; None on the other ranks."""
    global _followers
    if world_size() == 1:
        return command()
    started_here = not dist.is_initialized()
    if started_here:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")  # as accelerate picks
    # Students are handed over on a CPU channel of their own: the other ranks wait on it while rank 0 harvests
    # and grades, for minutes or hours, which a training collective (and its GPU watchdog) would not allow.
    channel = dist.new_group(backend="gloo", timeout=timedelta(days=1))
    try:
        if dist.get_rank() != 0:
            while (job := _broadcast(None, channel)) is not None:
                train_student(*job)
            return None
        _followers = channel
        try:
            return command()
        finally:  # also on an error: the other ranks stop waiting, and rank 0 reports it
            _followers = None
            _broadcast(None, channel)
    finally:
        if started_here:
            dist.destroy_process_group()


def _broadcast(job, channel):
    """Rank 0's `job` on every rank."""
    box = [job]
    dist.broadcast_object_list(box, src=0, group=channel)
    return box[0]
