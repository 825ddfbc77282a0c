"""What a redaction policy adds to serving, side by side in one run.

    OMP_NUM_THREADS=1 distill-guard bench redaction [--prompts 256] [--rounds 5] [--repeats 20]

1. Post-processing: each policy applied to the same teacher completions (the reference teacher's greedy
   answers to held-out prompts), in microseconds per completion, against the teacher's own generation time
   per completion measured in the same run. `sealed` includes AES-256-GCM; streaming feeds 4-character chunks.
2. End to end: `teacher.complete` and `Redact(teacher, policy).complete` on the same prompts, alternating
   rounds (A B A B ...), so load from other jobs falls on both; the median of each round's paired ratio.
Both are written to eval/results/benchmarks/redaction_speed.json.
"""

from __future__ import annotations

import json
import time

import numpy as np

from eval.benchmarks import write_result
from eval.reference.world import reference_task
from guard.redaction import Redact, StreamRedactor, parse_policy
from eval.reference import load_teacher
from guard.teacher import Sampling

POLICIES = ("full", "answer-only", "summary", "truncate:4", "truncate:8", "sealed")
GREEDY = Sampling(temperature=0.0, max_new_tokens=64)


def post_processing(prompts: list[str], texts: list[str], repeats: int) -> dict:
    out = {}
    for spec in POLICIES:
        chosen = parse_policy(spec)  # sealed: a random key when $DISTILL_GUARD_SEAL_KEY is unset
        start = time.perf_counter()
        for _ in range(repeats):
            chosen.redact(prompts, texts)
        batch_us = (time.perf_counter() - start) / (repeats * len(texts)) * 1e6
        start = time.perf_counter()
        for _ in range(repeats):
            for prompt, text in zip(prompts, texts):
                stream = StreamRedactor(chosen, prompt)
                for i in range(0, len(text), 4):
                    stream.feed(text[i:i + 4])
                stream.finish()
        stream_us = (time.perf_counter() - start) / (repeats * len(texts)) * 1e6
        out[spec] = {"us_per_completion": batch_us, "streamed_us_per_completion": stream_us}
    return out


def end_to_end(teacher, prompts: list[str], rounds: int) -> dict:
    out = {}
    for spec in POLICIES:
        served = Redact(teacher, parse_policy(spec))
        ratios = []
        for _ in range(rounds):
            start = time.perf_counter()
            teacher.complete(prompts, GREEDY)
            plain = time.perf_counter() - start
            start = time.perf_counter()
            served.complete(prompts, GREEDY)
            ratios.append((time.perf_counter() - start) / plain - 1)
        out[spec] = {"overhead_median_of_pairs": float(np.median(ratios)), "rounds": rounds}
    return out


def main(prompts: int = 256, rounds: int = 5, repeats: int = 20) -> dict:
    teacher = load_teacher("reference")
    chosen = [i.prompt for i in reference_task().eval_items[:prompts]]
    teacher.complete(chosen[:8], GREEDY)  # warm-up
    start = time.perf_counter()
    texts = [c.text for c in teacher.complete(chosen, GREEDY)]
    generation_us = (time.perf_counter() - start) / len(chosen) * 1e6
    processing = post_processing(chosen, texts, repeats)
    for row in processing.values():
        row["share_of_generation"] = row["us_per_completion"] / generation_us
    results = {"completions": len(texts), "generation_us_per_completion": generation_us,
               "post_processing": processing, "end_to_end": end_to_end(teacher, chosen, rounds)}
    print(json.dumps(results, indent=2))
    print("wrote", write_result("redaction_speed", results))
    return results
