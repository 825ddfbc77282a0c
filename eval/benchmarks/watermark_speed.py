"""Watermark speed, side by side in one run.

    python -m eval.benchmarks.watermark_speed [--tokens 1000000] [--rounds 5]

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

from eval.reference.world import reference_task
from guard.teacher import load_teacher
from watermark.detect import TransformersGreenList, WatermarkDetector
from watermark.kgw import LAB_MASTER, GreenList, GreenListProcessor, WatermarkConfig, WatermarkKey

PROSE_DIRS = ("/usr/share/common-licenses", "/usr/share/doc")


def prose_token_sequences(tokenizer, tokens: int, length: int = 256) -> list[list[int]]:
    """Real text from this machine, tokenized, cut into sequences, repeated if the machine has too little."""
    ids: list[int] = []
    for directory in PROSE_DIRS:
        for path in sorted(Path(directory).rglob("*")):
            if len(ids) >= tokens:
                break
            if path.is_file() and path.suffix in ("", ".txt", ".md") and path.stat().st_size < 2_000_000:
                try:
                    ids += tokenizer(path.read_text(errors="ignore"), add_special_tokens=False)["input_ids"]
                except (OSError, UnicodeError):
                    continue
    if not ids:
        raise RuntimeError(f"no prose found under {PROSE_DIRS}")
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    return [ids[i:i + length] for i in range(0, tokens, length)]


def detection(tokens: int, gamma: float = 0.25, hashing_key: int = 15485863) -> dict:
    teacher = load_teacher("reference")
    vocab = len(teacher.tokenizer)
    sequences = prose_token_sequences(teacher.tokenizer, tokens)
    bos = teacher.model.config.bos_token_id
    sequences = [s for s in sequences if len(s) == 256 and s[0] != bos]  # transformers drops a leading BOS
    scored_tokens = sum(len(s) for s in sequences)

    start = time.perf_counter()
    green_list = TransformersGreenList(vocab, gamma, hashing_key)
    table_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours = WatermarkDetector(green_list, dedup=True).detect(sequences)
    ours_seconds = time.perf_counter() - start

    theirs_detector = HFWatermarkDetector(teacher.model.config, "cpu",
                                          WatermarkingConfig(greenlist_ratio=gamma, hashing_key=hashing_key,
                                                             seeding_scheme="lefthash", context_width=1),
                                          ignore_repeated_ngrams=True)
    start = time.perf_counter()
    theirs = theirs_detector(torch.tensor(sequences), return_dict=True)
    theirs_seconds = time.perf_counter() - start
    difference = float(np.max(np.abs(np.array([d.z for d in ours]) - theirs.z_score)))
    return {"tokens": scored_tokens, "sequences": len(sequences), "vocab": vocab,
            "ours_tokens_per_s": scored_tokens / ours_seconds, "transformers_tokens_per_s": scored_tokens / theirs_seconds,
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
    return {"batch_size": batch_size, "new_tokens": new_tokens, "rounds": rounds, "plain_seconds": plain,
            "watermarked_seconds": watermarked, "overhead": watermarked / plain - 1}


def main(tokens: int = 1_000_000, rounds: int = 5) -> dict:
    results = {"detection": detection(tokens), "generation": generation(rounds)}
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    main(args.tokens, args.rounds)
