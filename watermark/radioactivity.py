"""Radioactivity: was a suspect model trained on a watermarked teacher's outputs (Sander et al. 2024)?

A student that learned from watermarked text learned the green lists a little: in the contexts it saw,
it prefers green next tokens more often than chance. Two ways to look:

- **reading mode** (open model): teacher-force watermarked texts through the suspect and score its
  top-1 prediction at every position against the green list of the real preceding h tokens;
- **sampling mode** (closed model, text only): sample from the suspect and score what it writes,
  optionally only the n-grams the provider itself emitted (its logged outputs), where the signal lives.

Both score each (window, token) tuple once over the whole corpus and never score a window that reaches
into a prompt: the suspect may simply be copying the prompt, which says nothing about training.
Tuples are gathered once and then tested against as many keys as wanted.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from guard.teacher import GREEDY, Sampling, Teacher
from watermark.detect import Detection, binomial_test, name_client, unique_tuples, windows_and_tokens
from watermark.kgw import GreenList, WatermarkConfig, WatermarkKey


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]], width: int) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.zeros((0, width), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate([w for w, _ in pairs]), np.concatenate([t for _, t in pairs])


@torch.no_grad()
def reading_tuples(model: PreTrainedModel, sequences: list[list[int]], prompt_lengths: list[int], width: int,
                   batch_size: int = 64, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(window, suspect's top-1 prediction) for every completion position whose window is all completion."""
    model.eval()
    device = next(model.parameters()).device
    pairs = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        predictions = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu().numpy()
        for row, seq in enumerate(chunk):
            # the prediction made at position i is for position i + 1, after the window seq[i+1-h : i+1]
            predicted = np.concatenate([[0], predictions[row, : len(seq) - 1]])
            windows, _ = windows_and_tokens(seq, width, prompt_lengths[start + row] + width)
            first = max(prompt_lengths[start + row] + width, width)
            pairs.append((windows, predicted[first: len(seq)]))
    return _stack(pairs, width)


def sampled_tuples(suspect: Teacher, prompts: list[str], tokenizer: PreTrainedTokenizerBase, width: int,
                   sampling: Sampling = GREEDY) -> tuple[np.ndarray, np.ndarray]:
    """(window, token) pairs of what the suspect writes, re-tokenized with the watermark's tokenizer (the
    suspect may be an HTTP endpoint), windows inside the completion only."""
    pairs = []
    for prompt, completion in zip(prompts, suspect.complete(prompts, sampling)):
        ids = tokenizer(completion.text, add_special_tokens=False)["input_ids"]
        pairs.append(windows_and_tokens(ids, width))
    return _stack(pairs, width)


def ngrams(sequences: list[list[int]], prompt_lengths: list[int], width: int) -> set[tuple[int, ...]]:
    """Every (h+1)-gram of the completions: the provider's logged outputs, for `restrict_to`."""
    windows, tokens = _stack([windows_and_tokens(s, width, p + width) for s, p in zip(sequences, prompt_lengths)],
                             width)
    return set(map(tuple, np.concatenate([windows, tokens[:, None]], axis=1).tolist()))


def restrict_to(windows: np.ndarray, tokens: np.ndarray, allowed: set[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
    keep = np.array([tuple(row) in allowed for row in np.concatenate([windows, tokens[:, None]], axis=1).tolist()],
                    dtype=bool)
    return windows[keep], tokens[keep]


def score_tuples(green_list: GreenList, windows: np.ndarray, tokens: np.ndarray) -> Detection:
    """Each distinct (window, token) tuple counted once, then the exact binomial test."""
    if len(tokens):
        windows, tokens = unique_tuples(windows, tokens)
    green = int(green_list.green(torch.from_numpy(windows), torch.from_numpy(tokens)).sum()) if len(tokens) else 0
    return binomial_test(green, len(tokens), green_list.gamma)


def audit(windows: np.ndarray, tokens: np.ndarray, keys: list[WatermarkKey], vocab_size: int,
          config: WatermarkConfig = WatermarkConfig(), alpha: float = 1e-3) -> dict:
    """Test gathered tuples against every key; Holm across keys names the client whose key fires."""
    if len(tokens) and tokens.max() >= vocab_size:
        raise ValueError(f"suspect predicts token id {int(tokens.max())}, outside the watermark's vocabulary of "
                         f"{vocab_size}: reading mode needs the teacher's tokenizer")
    detections = {k.label: score_tuples(GreenList(k, vocab_size, config), windows, tokens) for k in keys}
    verdict = name_client(detections, alpha)
    return {**verdict, "detections": {c: d.to_dict() for c, d in detections.items()},
            "fingerprints": {k.label: k.fingerprint for k in keys}, "config": asdict(config),
            "tuples": int(len(tokens))}
