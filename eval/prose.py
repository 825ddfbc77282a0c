"""Real human prose found on this machine (licences, package documentation), for calibration and
benchmarks: distinct paragraphs, each once however many packages ship it."""

from __future__ import annotations

import sys
from pathlib import Path

PROSE_DIRS = ("/usr/share/common-licenses", "/usr/share/doc")


def prose_files() -> list[Path]:
    """Documentation under /usr/share, then the package descriptions and licences of this environment
    (present wherever the toolkit is installed)."""
    files = [p for d in PROSE_DIRS for p in sorted(Path(d).rglob("*"))]
    for site in sorted({Path(p) for p in sys.path if p.endswith("site-packages")}):
        files += sorted(site.glob("*.dist-info/METADATA")) + sorted(site.glob("*.dist-info/LICENSE*"))
    return files


def human_prose(max_chars: int) -> list[str]:
    """Distinct paragraphs of real text on this machine (licences, package documentation); each paragraph
    once, however many packages ship the same licence."""
    seen, paragraphs, total = set(), [], 0
    for path in prose_files():
        if total >= max_chars:
            break
        if not path.is_file() or path.suffix not in ("", ".txt", ".md") or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except (OSError, UnicodeError):
            continue
        for paragraph in text.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) > 80 and paragraph not in seen:
                seen.add(paragraph)
                paragraphs.append(paragraph)
                total += len(paragraph)
    return paragraphs


def prose_token_sequences(tokenizer, tokens: int, length: int = 256, repeat: bool = True) -> list[list[int]]:
    """Human prose tokenized and cut into `length`-token sequences; repeated to reach `tokens` only if
    `repeat` (fine for timing, not for calibration)."""
    ids: list[int] = []
    for paragraph in human_prose(max_chars=8 * tokens):
        ids += tokenizer(paragraph, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    if not ids:
        raise RuntimeError(f"no prose found under {PROSE_DIRS}")
    if repeat:
        ids = (ids * (tokens // len(ids) + 1))[:tokens]
    ids = ids[:tokens]
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
