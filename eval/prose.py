"""Real human prose, shipped with the lab so that every machine simulates the same traffic: the distinct
paragraphs of the licence texts Debian keeps in /usr/share/common-licenses (GPL, LGPL, GFDL, Apache, MPL,
Artistic, BSD, CC0; each licence permits verbatim copies of itself), in eval/reference/prose.txt.gz."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

from guard.prompts import text_ids

CORPUS = Path(__file__).parent / "reference" / "prose.txt.gz"


@functools.lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    return tuple(p for p in gzip.decompress(CORPUS.read_bytes()).decode().split("\n\n") if p.strip())


def human_prose(max_chars: int) -> list[str]:
    """Distinct paragraphs of the shipped corpus, in order, up to about `max_chars` characters."""
    paragraphs, total = [], 0
    for paragraph in _paragraphs():
        if total >= max_chars:
            break
        paragraphs.append(paragraph)
        total += len(paragraph)
    return paragraphs


def prose_token_sequences(tokenizer, tokens: int, length: int = 256, repeat: bool = True) -> list[list[int]]:
    """Human prose tokenized and cut into `length`-token sequences; repeated to reach `tokens` only if
    `repeat` (fine for timing, not for calibration)."""
    ids: list[int] = []
    for paragraph in human_prose(max_chars=8 * tokens):
        ids += text_ids(tokenizer, [paragraph])[0]
        if len(ids) >= tokens:
            break
    if repeat:
        ids = (ids * (tokens // len(ids) + 1))[:tokens]
    ids = ids[:tokens]
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
