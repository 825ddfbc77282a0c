"""Tasks: prompts with gold answers, split into held-out evaluation items and an attacker's pool.

A completion is split into visible reasoning and a final answer by the first format that applies:
R1-style ``<think>…</think>``, GSM8K-style ``… #### 42``, or a final ``answer: …`` line (the
reference task's format). The grader then checks the answer by name: ``exact``, ``numeric`` or
``gsm8k``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from guard.reasoning import ANSWER_LINE, split_reasoning

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass
class Item:
    prompt: str
    answer: str
    reasoning: str | None = None
    kind: str = ""


def normalize(answer: str) -> str:
    answer = ANSWER_LINE.sub(r"\1", answer)
    return re.sub(r"\s+", " ", answer).strip().strip(".!?,;:").strip().lower()


def parse_number(text: str) -> float | None:
    numbers = NUMBER.findall(text)
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", ""))
    except ValueError:
        return None


def grade_exact(completion: str, gold: str) -> bool:
    return normalize(split_reasoning(completion)[1]) == normalize(gold)


def grade_numeric(completion: str, gold: str) -> bool:
    got, want = parse_number(split_reasoning(completion)[1]), parse_number(gold)
    return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)


def grade_gsm8k(completion: str, gold: str) -> bool:
    if "####" not in completion:
        return False
    return grade_numeric(completion.rpartition("####")[2], gold.rpartition("####")[2])


GRADERS = {"exact": grade_exact, "numeric": grade_numeric, "gsm8k": grade_gsm8k}


@dataclass
class Task:
    """Held-out evaluation items, a disjoint attacker's pool, and a grader chosen by name."""

    name: str
    eval_items: list[Item]
    query_pool: list[Item]
    grader: str = "exact"
    meta: dict = field(default_factory=dict)
    max_new_tokens: int = 64  # how long an answer to an evaluation item may be (greedy grading)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.grader not in GRADERS:
            raise ValueError(f"unknown grader {self.grader!r}; choose one of {sorted(GRADERS)}")
        overlap = {i.prompt for i in self.eval_items} & {i.prompt for i in self.query_pool}
        if overlap:
            raise ValueError(f"task {self.name!r}: {len(overlap)} prompts are both evaluation items "
                             f"and in the attacker's pool, e.g. {next(iter(overlap))!r}")

    def split(self, completion: str) -> tuple[str | None, str]:
        return split_reasoning(completion)

    def is_correct(self, completion: str, gold: str) -> bool:
        return GRADERS[self.grader](completion, gold)


class TaskFormatError(ValueError):
    """A custom task file is malformed; the message names the file, the row and the problem."""


def _read_rows(path: Path) -> list[tuple[int, object]]:
    if path.is_dir() or path.suffix == ".arrow":
        try:
            ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_file(str(path))
        except Exception as exc:  # datasets raises many types for unreadable files
            raise TaskFormatError(f"{path}: not a readable Arrow dataset ({exc})") from exc
        return list(enumerate(ds, start=1))
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise TaskFormatError(f"{path}: row {number}: invalid JSON ({exc.msg})") from exc
    return rows


def _to_item(path: Path, number: int, row: object) -> tuple[Item, str | None]:
    where = f"{path}: row {number}"
    if not isinstance(row, dict):
        raise TaskFormatError(f"{where}: expected an object with 'prompt' and 'answer', got {type(row).__name__}")
    for column in ("prompt", "answer"):
        if column not in row or row[column] is None:
            raise TaskFormatError(f"{where}: missing required column {column!r}")
    prompt, answer, reasoning = row["prompt"], row["answer"], row.get("reasoning")
    if not isinstance(prompt, str) or not prompt.strip():
        raise TaskFormatError(f"{where}: 'prompt' must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TaskFormatError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
    if reasoning is not None and not isinstance(reasoning, str):
        raise TaskFormatError(f"{where}: 'reasoning' must be a string when present")
    split = row.get("split")
    if split not in (None, "eval", "pool"):
        raise TaskFormatError(f"{where}: 'split' must be 'eval' or 'pool', got {split!r}")
    return Item(prompt=prompt, answer=str(answer), reasoning=reasoning), split


def load_task(path: str | Path, grader: str = "exact", eval_fraction: float = 0.2, seed: int = 0,
              name: str | None = None) -> Task:
    """Load a task from JSONL or Arrow with columns prompt, answer, optional reasoning and split.

    Rows with ``split`` = "eval"/"pool" go where they say; otherwise a seeded random
    ``eval_fraction`` of the distinct prompts is held out for evaluation.
    """
    path = Path(path)
    if not path.exists():
        raise TaskFormatError(f"{path}: no such file or directory")
    if grader not in GRADERS:
        raise TaskFormatError(f"unknown grader {grader!r}; choose one of {sorted(GRADERS)}")
    parsed = [_to_item(path, number, row) for number, row in _read_rows(path)]
    if not parsed:
        raise TaskFormatError(f"{path}: no rows")
    explicit = [split for _, split in parsed]
    if any(s is not None for s in explicit):
        if any(s is None for s in explicit):
            missing = next(i for i, s in enumerate(explicit) if s is None)
            raise TaskFormatError(f"{path}: row {missing + 1}: 'split' is set on some rows but not this one")
        eval_items = [item for item, s in parsed if s == "eval"]
        pool = [item for item, s in parsed if s == "pool"]
    else:
        prompts = sorted({item.prompt for item, _ in parsed})
        order = np.random.default_rng(seed).permutation(len(prompts))
        held = {prompts[i] for i in order[: max(1, round(eval_fraction * len(prompts)))]}
        eval_items = [item for item, _ in parsed if item.prompt in held]
        pool = [item for item, _ in parsed if item.prompt not in held]
    try:
        return Task(name=name or path.stem, eval_items=eval_items, query_pool=pool, grader=grader)
    except ValueError as exc:
        raise TaskFormatError(f"{path}: {exc}") from exc
