"""Built-in trainer tokens/s against a bare PyTorch loop: same model, batch, data and optimiser.

    OMP_NUM_THREADS=1 distill-guard bench trainer [--steps 100] [--rounds 3]

The two run alternately in one process (A B A B ...), so load from other jobs on this shared
machine falls on both; the ratio of the summed tokens/s is reported and written to
eval/results/benchmarks/trainer_speed.json.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from eval.benchmarks import write_result
from eval.reference import MODELS_DIR
from eval.reference.build import teacher_examples
from eval.reference.world import Style, reference_world
from eval.trainer import CompletionCollator, TrainConfig, tokenize_pairs, train


def fresh_model(seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODELS_DIR / "student"))


def bare_loop(dataset, tokenizer, steps: int, batch_size: int, lr: float) -> tuple[int, float]:
    """The least a training loop can do: shuffle, collate, forward, backward, AdamW, cosine schedule."""
    model = fresh_model(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps)))
    collate = CompletionCollator(tokenizer.pad_token_id)
    order = np.random.default_rng(0).permutation(len(dataset))
    tokens, start = 0, time.perf_counter()
    for step in range(steps):
        batch = collate([dataset[int(i)] for i in order[step * batch_size:(step + 1) * batch_size]])
        tokens += int(batch["attention_mask"].sum())
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return tokens, time.perf_counter() - start


def main(steps: int = 100, rounds: int = 3, batch_size: int = 64) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(MODELS_DIR / "student")
    prompts, completions = teacher_examples(reference_world(), Style(101), steps * batch_size, seed=0)
    dataset = tokenize_pairs(tokenizer, prompts, completions)
    totals = {"bare": [0, 0.0], "trainer": [0, 0.0]}
    for round_ in range(rounds):
        tokens, seconds = bare_loop(dataset, tokenizer, steps, batch_size, 2e-3)
        totals["bare"][0] += tokens
        totals["bare"][1] += seconds
        result = train(fresh_model(0), tokenizer, dataset,
                       TrainConfig(steps=steps, batch_size=batch_size, lr=2e-3, warmup_steps=0, log_every=10**9,
                                   output_dir="runs/bench-trainer"), progress=False)
        totals["trainer"][0] += result.tokens
        totals["trainer"][1] += result.seconds
        print(f"round {round_ + 1}: bare {tokens / seconds:,.0f} tok/s, trainer {result.tokens_per_s:,.0f} tok/s",
              flush=True)
    speed = {k: t / s for k, (t, s) in totals.items()}
    out = {"steps_per_round": steps, "rounds": rounds, "batch_size": batch_size,
           "bare_tokens_per_s": round(speed["bare"]), "trainer_tokens_per_s": round(speed["trainer"]),
           "ratio": round(speed["trainer"] / speed["bare"], 3), "torch_threads": torch.get_num_threads()}
    print(json.dumps(out, indent=2))
    print("wrote", write_result("trainer_speed", out))
    return out
