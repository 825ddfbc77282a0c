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

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from guard.hf_teacher import load_causal_lm
from guard.load import load_teacher
from guard.prompts import pair_ids, text_ids
from guard.teacher import GREEDY, Sampling, Teacher
from watermark.detect import name_client, score_tuples, windows_and_tokens
from watermark.kgw import GreenList, WatermarkConfig, WatermarkKey


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]], width: int) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.zeros((0, width), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate([w for w, _ in pairs]), np.concatenate([t for _, t in pairs])


@torch.no_grad()
def reading_tuples(model: PreTrainedModel, sequences: list[list[int]], prompt_lengths: list[int], width: int,
                   batch_size: int = 64, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(window, suspect's top-1 prediction) for every completion position whose window is all completion.

    The null is approximate, not exact: the text's own tokens are green-enriched, so a model of the same
    language that predicts them well inherits part of that excess without ever having seen the watermark.
    Sampling mode (the suspect writes; its text never depends on the key) has an exact null."""
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
        [ids] = text_ids(tokenizer, [completion.text])
        pairs.append(windows_and_tokens(ids, width))
    return _stack(pairs, width)


def logged_windows(sequences: list[list[int]], prompt_lengths: list[int], width: int) -> set[tuple[int, ...]]:
    """Every watermark window (h-gram context) of the completions: the provider's logged outputs, for
    `restrict_to`. Windows, not (window, token) tuples: the logged tuples are green-enriched by the watermark,
    so keeping a suspect's tuples that match them would select green tokens and accuse any model that writes
    the same phrases; which windows were logged says nothing about the green list of the next token."""
    windows, _ = _stack([windows_and_tokens(s, width, p + width) for s, p in zip(sequences, prompt_lengths)], width)
    return set(map(tuple, windows.tolist()))


def restrict_to(windows: np.ndarray, tokens: np.ndarray, allowed: set[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """The tuples whose window the provider logged (see `logged_windows`)."""
    keep = np.array([tuple(row) in allowed for row in windows.tolist()], dtype=bool)
    return windows[keep], tokens[keep]


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


def read_texts(path: str | Path) -> tuple[list[str], list[str]]:
    """(prompts, texts) from a JSONL file of {"prompt", "text"} rows."""
    path = Path(path)
    prompts, texts = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append(str(row.get("prompt", "")))
            texts.append(str(row["text"]))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise ValueError(f"{path}:{number}: expected a JSON object with a \"text\" (and \"prompt\") field") from None
    if not texts:
        raise ValueError(f"{path}: no texts")
    return prompts, texts


def radioactivity(suspect: str, keys: list[WatermarkKey], tokenizer: PreTrainedTokenizerBase, mode: str = "reading",
                  texts: tuple[list[str], list[str]] | None = None, prompts: list[str] | None = None,
                  logged: tuple[list[str], list[str]] | None = None, config: WatermarkConfig = WatermarkConfig(),
                  alpha: float = 1e-3, sampling: Sampling = Sampling(temperature=1.0, seed=0, max_new_tokens=64),
                  api_key: str | None = None, model_name: str | None = None, texts_source: str = "texts",
                  texts_watermarked: bool = True) -> dict:
    """The whole audit of one suspect: gather tuples in `mode`, test every key, name the client (Holm).

    `tokenizer` is the watermarked teacher's. reading: `suspect` is a local model directory (safetensors
    only); `texts` = (prompts, teacher outputs) to read. Unwatermarked texts (`texts_watermarked=False`)
    give an exact null; watermarked ones (e.g. the account's logs) are read more sharply but their null is
    approximate (see `reading_tuples`), so the report says which it is. sampling: `suspect` is anything
    `load_teacher` takes (a path, or an HTTP endpoint); it answers `prompts`; `logged` = (prompts, texts)
    the provider logged restricts scoring to their windows.
    """
    width = config.context_width
    if mode == "reading":
        if texts is None:
            raise ValueError("reading mode needs teacher texts to read")
        model, suspect_tokenizer = load_causal_lm(suspect)
        if suspect_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{suspect}: its tokenizer differs from the teacher's; reading mode needs a suspect "
                             "that shares it (use --mode sampling for any other model)")
        text_prompts, bodies = texts
        sequences, prompt_lengths = pair_ids(tokenizer, text_prompts, bodies)
        windows, tokens = reading_tuples(model, sequences, prompt_lengths, width, pad_id=tokenizer.pad_token_id or 0)
        source = {"texts": texts_source, "sequences": len(sequences),
                  "null": "approximate if the texts carry the watermark" if texts_watermarked else
                          "exact (unwatermarked texts)"}
    elif mode == "sampling":
        if not prompts:
            raise ValueError("sampling mode needs prompts for the suspect to answer")
        windows, tokens = sampled_tuples(load_teacher(suspect, api_key=api_key, model=model_name), prompts,
                                         tokenizer, width, sampling)
        source = {"prompts": len(prompts)}
        if logged:
            logged_ids = text_ids(tokenizer, logged[1])
            windows, tokens = restrict_to(windows, tokens, logged_windows(logged_ids, [0] * len(logged_ids), width))
            source["logged"] = len(logged_ids)
    else:
        raise ValueError(f"unknown audit mode {mode!r}; choose reading or sampling")
    report = audit(windows, tokens, keys, len(tokenizer), config, alpha)
    return {"suspect": suspect, "mode": mode, **source, **report}
