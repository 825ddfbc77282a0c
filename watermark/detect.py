"""Watermark detection: count green tokens, test against chance with an exact one-sided binomial p-value.

Under "no watermark" every scored (context, token) pair is green with probability γ, independently of
the others, *if* each pair is scored once: a text that repeats a phrase would otherwise count its
green tokens many times. So repeated (h-token window, token) tuples are scored once (on by default),
as the radioactivity literature requires. The p-value is the binomial tail P(X >= green), exact
(scipy), never a normal approximation: in the tails that matter (p < 1e-6) the approximation is off
by orders of magnitude.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import binom
from transformers.generation.logits_process import WatermarkLogitsProcessor

from guard.prompts import pair_ids, text_ids
from watermark.kgw import GreenList


@dataclass
class Detection:
    scored: int  # distinct (window, token) tuples scored
    green: int
    gamma: float
    z: float
    p_value: float  # exact one-sided binomial tail: small = evidence of the watermark

    @property
    def green_fraction(self) -> float:
        return self.green / self.scored if self.scored else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "green_fraction": self.green_fraction}


def binomial_test(green: int, scored: int, gamma: float) -> Detection:
    return binomial_tests(np.array([green]), np.array([scored]), gamma)[0]


def binomial_tests(green: np.ndarray, scored: np.ndarray, gamma: float) -> list[Detection]:
    """Exact one-sided tail P(X >= green), X ~ Binomial(scored, gamma), for many texts at once."""
    green, scored = np.asarray(green, dtype=np.int64), np.asarray(scored, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (green - gamma * scored) / np.sqrt(scored * gamma * (1 - gamma))
    p = np.where(scored > 0, binom.sf(green - 1, scored, gamma), 1.0)
    return [Detection(int(n), int(g), gamma, float(zi) if n else float("nan"), float(pi))
            for g, n, zi, pi in zip(green, scored, z, p)]


def windows_and_tokens(ids: list[int] | np.ndarray, width: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every (h-token window, next token) pair whose token sits at position >= max(start, width)."""
    _, windows, tokens = corpus_tuples([ids], width, [start])
    return windows, tokens


def corpus_tuples(sequences: list | np.ndarray, width: int, starts: list[int] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sequence index, window, token) for every scorable position of every sequence, with no Python loop
    over positions: the token at position i of a sequence is scored if i >= max(start, width)."""
    if isinstance(sequences, (np.ndarray, torch.Tensor)) and sequences.ndim == 2:  # a batch of equal lengths
        flat = np.asarray(sequences, dtype=np.int64).reshape(-1)
        lengths = np.full(len(sequences), sequences.shape[1], dtype=np.int64)
    else:
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(sequences) else \
            np.zeros(0, np.int64)
    first = np.maximum(np.asarray(starts if starts is not None else [0] * len(sequences), dtype=np.int64), width)
    counts = np.maximum(lengths - first, 0)
    total = int(counts.sum())
    sequence = np.repeat(np.arange(len(sequences)), counts)
    offsets = np.cumsum(lengths) - lengths
    position = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(offsets + first, counts)
    windows = flat[position[:, None] + np.arange(-width, 0)[None, :]] if total else np.zeros((0, width), np.int64)
    return sequence, windows, flat[position]


def pack_rows(rows: np.ndarray) -> tuple[np.ndarray, list[int]] | None:
    """Each non-negative int64 row as one int64 (mixed radix, exact), or None if the rows are too wide."""
    bases = [int(b) + 1 for b in rows.max(axis=0)]
    if np.prod(bases, dtype=object) >= 2**61:
        return None
    key = rows[:, 0].copy()
    for column in range(1, rows.shape[1]):
        key *= bases[column]
        key += rows[:, column]
    return key, bases


def sorted_unique(key: np.ndarray) -> np.ndarray:
    """np.unique for int64 by sort-and-compare: numpy 2's hash-based np.unique is several times slower."""
    key = np.sort(key)
    return key[np.concatenate([[True], key[1:] != key[:-1]])]


def unique_rows(rows: np.ndarray) -> np.ndarray:
    """np.unique(rows, axis=0) for non-negative int64 rows, fast when each row packs into one int64."""
    packed = pack_rows(rows) if len(rows) else None
    if packed is None:
        return np.unique(rows, axis=0)
    key, bases = sorted_unique(packed[0]), packed[1]
    out = np.empty((len(key), rows.shape[1]), dtype=rows.dtype)
    for column in range(rows.shape[1] - 1, 0, -1):
        key, out[:, column] = np.divmod(key, bases[column])
    out[:, 0] = key
    return out


def unique_tuples(windows: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tuples = unique_rows(np.concatenate([windows, tokens[:, None]], axis=1))
    return tuples[:, :-1], tuples[:, -1]


def score_tuples(green_list, windows: np.ndarray, tokens: np.ndarray, dedup: bool = True) -> Detection:
    """Each distinct (window, token) tuple counted once (with `dedup`), then the exact binomial test."""
    if dedup and len(tokens):
        windows, tokens = unique_tuples(windows, tokens)
    green = int(green_list.green(torch.from_numpy(windows), torch.from_numpy(tokens)).sum()) if len(tokens) else 0
    return binomial_test(green, len(tokens), green_list.gamma)


class TransformersGreenList:
    """The green lists of transformers' own `WatermarkLogitsProcessor` (lefthash, context width 1), so text
    watermarked by `generate(watermarking_config=...)` is detected with the same z-scores as its
    `WatermarkDetector`.

    Each green list is a reseeded `randperm` of the whole vocabulary, so a vocab x vocab table would cost
    vocab^2 bytes and vocab permutations (tens of GB at a 150k vocabulary). Instead each call draws the
    green list of every distinct context it is given, once, and memory stays one vocabulary row.
    """

    width = 1

    def __init__(self, vocab_size: int, gamma: float = 0.25, hashing_key: int = 15485863):
        self.vocab_size, self.gamma = vocab_size, gamma
        self._processor = WatermarkLogitsProcessor(vocab_size, "cpu", greenlist_ratio=gamma, hashing_key=hashing_key,
                                                   seeding_scheme="lefthash", context_width=1)

    def _green_ids(self, previous: int) -> torch.Tensor:
        return self._processor._get_greenlist_ids(torch.tensor([previous]))

    def green(self, windows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        previous, tokens = windows[..., -1].reshape(-1).long().cpu(), tokens.reshape(-1).long().cpu()
        order = torch.argsort(previous, stable=True)
        contexts, counts = torch.unique_consecutive(previous[order], return_counts=True)
        out = torch.empty(len(tokens), dtype=torch.bool)
        row = torch.zeros(self.vocab_size, dtype=torch.bool)
        for context, positions in zip(contexts.tolist(), torch.split(order, counts.tolist())):
            green_ids = self._green_ids(context)
            row[green_ids] = True
            out[positions] = row[tokens[positions]]
            row[green_ids] = False
        return out.reshape(windows.shape[:-1]).to(windows.device)

    def mask(self, windows: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(windows), self.vocab_size, dtype=torch.bool)
        for i, previous in enumerate(windows[:, -1].tolist()):
            out[i, self._green_ids(previous)] = True
        return out.to(windows.device)


class WatermarkDetector:
    """Scores token sequences (or texts, given the tokenizer) against one key's green lists.

    Args:
        green_list: the key, γ and h to test.
        dedup: score each (window, token) tuple once per text (per corpus in `detect_corpus`).
        tokenizer: needed only for `detect_texts`.
    """

    def __init__(self, green_list: GreenList | TransformersGreenList, dedup: bool = True, tokenizer=None):
        self.green_list, self.dedup, self.tokenizer = green_list, dedup, tokenizer

    def _green(self, windows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        if not len(tokens):
            return np.zeros(0, dtype=bool)
        return self.green_list.green(torch.from_numpy(windows), torch.from_numpy(tokens)).numpy()

    def detect(self, sequences: list[list[int]] | np.ndarray, prompt_lengths: list[int] | None = None) -> list[Detection]:
        """One test per sequence (a list of id lists, or a 2-D array); the first `prompt_lengths[i]` tokens
        (the prompt) are never scored."""
        if prompt_lengths is not None and len(prompt_lengths) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(prompt_lengths)} prompt lengths")
        sequence, windows, tokens = corpus_tuples(sequences, self.green_list.width, prompt_lengths)
        green = self._green(windows, tokens)
        if self.dedup and len(tokens):  # once per (sequence, window, token)
            rows = np.concatenate([sequence[:, None], windows, tokens[:, None]], axis=1)
            packed = pack_rows(rows)
            if packed is not None:  # green is a function of the row, so it can ride along in the key's low bit
                key, bases = packed
                key = sorted_unique(key * 2 + green)
                green, sequence = key & 1, (key >> 1) // int(np.prod(bases[1:], dtype=object))
            else:
                rows = np.unique(rows, axis=0)
                sequence, green = rows[:, 0], self._green(rows[:, 1:-1], rows[:, -1])
        scored = np.bincount(sequence, minlength=len(sequences))
        return binomial_tests(np.bincount(sequence, weights=green, minlength=len(sequences)).astype(np.int64), scored,
                              self.green_list.gamma)

    def detect_corpus(self, sequences: list[list[int]], prompt_lengths: list[int] | None = None) -> Detection:
        """One test over all sequences together, each (window, token) tuple scored once across the corpus."""
        _, windows, tokens = corpus_tuples(sequences, self.green_list.width, prompt_lengths)
        return score_tuples(self.green_list, windows, tokens, self.dedup)

    def tokenize(self, texts: list[str], prompts: list[str] | None = None) -> tuple[list[list[int]], list[int] | None]:
        if self.tokenizer is None:
            raise ValueError("detecting texts needs the tokenizer the watermark was applied with")
        if prompts is None:
            return text_ids(self.tokenizer, texts), None
        return pair_ids(self.tokenizer, prompts, texts)

    def detect_texts(self, texts: list[str], prompts: list[str] | None = None) -> list[Detection]:
        return self.detect(*self.tokenize(texts, prompts))


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down; controls the family-wise error rate)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def name_client(detections: dict[str, Detection], alpha: float = 1e-3) -> dict:
    """Which client's key fires, testing every key and correcting for the number of keys (Holm).

    Returns the per-client adjusted p-values and `client`: the one with the smallest adjusted p-value
    if it is below `alpha`, else None.
    """
    clients = list(detections)
    adjusted = holm([detections[c].p_value for c in clients])
    best = int(np.argmin(adjusted)) if clients else None
    return {"client": clients[best] if best is not None and adjusted[best] < alpha else None, "alpha": alpha,
            "adjusted_p": dict(zip(clients, adjusted.tolist())),
            "p": {c: detections[c].p_value for c in clients}}
