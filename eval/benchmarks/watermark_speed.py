"""Watermark speed, side by side in one run.

    python -m eval.benchmarks.watermark_speed [--tokens 1000000] [--rounds 30]

1. Detection: our detector against transformers' `WatermarkDetector` on the same token sequences with a
   matching configuration (lefthash, context width 1, same γ and hashing key, repeated n-grams ignored),
   z-scores compared. Our side uses `TransformersGreenList` (transformers' green lists as a table) so
   both score exactly the same lists; the table build is timed separately.
2. Generation: the reference teacher's `generate` at batch 32 with and without the green-list
   processor, alternating rounds (A B A B ...) so load from other jobs falls on both.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import WatermarkDetector as HFWatermarkDetector
from transformers import LogitsProcessorList, WatermarkingConfig

from eval.prose import prose_token_sequences
from eval.reference.world import reference_task
from eval.reference import LAB_MASTER, load_teacher
from watermark.detect import TransformersGreenList, WatermarkDetector
from watermark.kgw import GreenList, GreenListProcessor, WatermarkConfig, WatermarkKey

def detection(tokens: int, rounds: int = 3, gamma: float = 0.25, hashing_key: int = 15485863) -> dict:
    teacher = load_teacher("reference")
    vocab = len(teacher.tokenizer)
    sequences = prose_token_sequences(teacher.tokenizer, tokens)
    bos = teacher.model.config.bos_token_id
    sequences = [s for s in sequences if len(s) == 256 and s[0] != bos]  # transformers drops a leading BOS
    scored_tokens = sum(len(s) for s in sequences)
    batch = np.array(sequences, dtype=np.int64)  # both sides get the same [n, 256] batch, converted untimed
    tensor = torch.from_numpy(batch)

    start = time.perf_counter()
    green_list = TransformersGreenList(vocab, gamma, hashing_key)
    table_seconds = time.perf_counter() - start
    ours_detector = WatermarkDetector(green_list, dedup=True)
    theirs_detector = HFWatermarkDetector(teacher.model.config, "cpu",
                                          WatermarkingConfig(greenlist_ratio=gamma, hashing_key=hashing_key,
                                                             seeding_scheme="lefthash", context_width=1),
                                          ignore_repeated_ngrams=True)
    keyed = WatermarkDetector(GreenList(WatermarkKey.for_client(LAB_MASTER, "benchmark"), vocab), dedup=True)
    seconds = {"ours": 0.0, "transformers": 0.0, "ours_keyed": 0.0}
    repeats = 10  # ours takes ~0.1 s a pass: repeated within each round so one context switch cannot double it
    for _ in range(rounds):  # alternating, so load from other jobs falls on both
        start = time.perf_counter()
        for _ in range(repeats):
            ours = ours_detector.detect(batch)
        seconds["ours"] += (time.perf_counter() - start) / repeats
        start = time.perf_counter()
        theirs = theirs_detector(tensor, return_dict=True)
        seconds["transformers"] += time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(repeats):
            keyed.detect(batch)
        seconds["ours_keyed"] += (time.perf_counter() - start) / repeats
    ours_seconds, theirs_seconds = seconds["ours"], seconds["transformers"]
    difference = float(np.max(np.abs(np.array([d.z for d in ours]) - theirs.z_score)))
    return {"tokens": scored_tokens, "sequences": len(sequences), "vocab": vocab, "rounds": rounds,
            "ours_tokens_per_s": rounds * scored_tokens / ours_seconds,
            "ours_keyed_prf_tokens_per_s": rounds * scored_tokens / seconds["ours_keyed"], "transformers_tokens_per_s": rounds * scored_tokens / theirs_seconds,
            "speedup": theirs_seconds / ours_seconds, "ours_seconds": ours_seconds, "transformers_seconds": theirs_seconds,
            "table_build_seconds": table_seconds, "max_abs_z_difference": difference}


@torch.no_grad()
def generation(rounds: int, batch_size: int = 32, new_tokens: int = 64) -> dict:
    teacher = load_teacher("reference")
    tok = teacher.tokenizer
    processor = LogitsProcessorList([GreenListProcessor(GreenList(WatermarkKey.for_client(LAB_MASTER, "benchmark"),
                                                                  len(tok), WatermarkConfig()))])
    prompts = [i.prompt for i in reference_task().query_pool[:batch_size]]
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    # exactly `new_tokens` steps on both sides, sampled as the teacher serves
    settings = dict(do_sample=True, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    pad_token_id=tok.pad_token_id)
    times = {"plain": [], "watermarked": []}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for name, extra in (("plain", {}), ("watermarked", {"logits_processor": processor})):
            torch.manual_seed(0)
            start = time.perf_counter()
            teacher.model.generate(**batch, **settings, **extra)
            times[name].append(time.perf_counter() - start)
    plain, watermarked = sum(times["plain"][1:]), sum(times["watermarked"][1:])
    paired = np.array(times["watermarked"][1:]) / np.array(times["plain"][1:]) - 1  # each round's A/B pair
    return {"batch_size": batch_size, "new_tokens": new_tokens, "rounds": rounds, "plain_seconds": plain,
            "watermarked_seconds": watermarked, "overhead": watermarked / plain - 1,
            "overhead_median_of_pairs": float(np.median(paired))}


def main(tokens: int = 1_000_000, rounds: int = 30) -> dict:
    results = {"detection": detection(tokens, rounds=3), "generation": generation(rounds)}
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=30, help="generation rounds (each ~0.2 s a side)")
    args = parser.parse_args()
    main(args.tokens, args.rounds)
