"""Harvest: query a (defended) teacher within a budget and keep every prompt/completion on disk.

Rows are flushed to Arrow shards as they arrive, each shard written to a temporary name and renamed,
so a killed harvest loses at most the chunk in flight. A resumed harvest replays the stored rows to the
attacker's strategy (which is deterministic given its seed and the answers it saw) and queries the
teacher only past them: no row is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from guard.teacher import Completion, Sampling, Teacher, TokenLogprob


@dataclass
class Budget:
    """What an attacker may spend: queries, and optionally completion tokens."""

    queries: int
    tokens: int | None = None

    def __post_init__(self):
        if self.queries < 1:
            raise ValueError(f"budget.queries must be >= 1, got {self.queries}")


class BudgetExhausted(Exception):
    pass


class HarvestMismatch(RuntimeError):
    """The stored harvest was made with other settings, or the strategy now asks something else."""


L = datasets.List
FEATURES = datasets.Features({
    "index": datasets.Value("int64"), "prompt": datasets.Value("string"), "text": datasets.Value("string"),
    "reasoning": datasets.Value("string"), "answer": datasets.Value("string"),
    "token_ids": L(datasets.Value("int32")), "completion_tokens": datasets.Value("int32"),
    "finish_reason": datasets.Value("string"), "top_ids": L(L(datasets.Value("int32"))),
    "top_tokens": L(L(datasets.Value("string"))), "top_logprobs": L(L(datasets.Value("float32"))),
})


def toolkit_version() -> str:
    try:
        return version("distill-guard")
    except PackageNotFoundError:
        return "unknown"


def completion_row(index: int, prompt: str, c: Completion) -> dict:
    top = c.logprobs or []
    return {
        "index": index, "prompt": prompt, "text": c.text, "reasoning": c.reasoning, "answer": c.answer,
        "token_ids": c.token_ids, "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
        "top_ids": [[t.id if t.id is not None else -1 for t in step] for step in top],
        "top_tokens": [[t.token for t in step] for step in top],
        "top_logprobs": [[t.logprob for t in step] for step in top],
    }


def _completion(row: dict) -> Completion:
    top = [[TokenLogprob(t, lp, i if i >= 0 else None) for t, lp, i in zip(ts, lps, ids)]
           for ts, lps, ids in zip(row["top_tokens"], row["top_logprobs"], row["top_ids"])]
    return Completion(text=row["text"], token_ids=list(row["token_ids"]), logprobs=top or None,
                      finish_reason=row["finish_reason"], completion_tokens=row["completion_tokens"])


class Harvester:
    """Answers a strategy's questions from the stored rows first, then from the teacher, within budget.

    Args:
        teacher: the (possibly defended) teacher to query.
        out_dir: where shards and the manifest live; an existing harvest there is resumed.
        budget: the queries (and completion tokens) the attacker may spend.
        sampling: decoding settings; each chunk's seed is `sampling.seed` + its first query index.
        manifest: what produced this harvest (teacher, defences, strategy...); must match on resume.
        chunk_size: queries per teacher call and per shard.
    """

    def __init__(self, teacher: Teacher, out_dir: str | Path, budget: Budget, sampling: Sampling,
                 manifest: dict, chunk_size: int = 64, progress: bool = True):
        self.teacher, self.out_dir, self.budget, self.sampling = teacher, Path(out_dir), budget, sampling
        self.chunk_size = chunk_size
        self.manifest = {**manifest, "budget": asdict(budget), "sampling": asdict(sampling),
                         "toolkit_version": toolkit_version()}
        self.stored = self._open()
        self.rows: list[dict] = []
        self.tokens = 0
        self.bar = tqdm(total=budget.queries, desc="harvest", unit="q", disable=not progress)

    def _open(self) -> list[dict]:
        manifest_path = self.out_dir / "manifest.json"
        if manifest_path.exists():
            stored = json.loads(manifest_path.read_text())
            wanted = {k: v for k, v in self.manifest.items() if k != "toolkit_version"}
            if {k: stored.get(k) for k in wanted} != wanted:
                raise HarvestMismatch(f"{self.out_dir} holds a harvest made with other settings; "
                                      "use another --out directory or delete it")
            shards = sorted((self.out_dir / "shards").glob("shard-*[0-9]"))
            if not shards:
                return []
            with _quiet_datasets():
                rows = datasets.concatenate_datasets([datasets.load_from_disk(str(s)) for s in shards]).to_list()
            return sorted(rows, key=lambda r: r["index"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "shards").mkdir(exist_ok=True)
        manifest_path.write_text(json.dumps(self.manifest, indent=2) + "\n")
        return []

    @property
    def queries_left(self) -> int:
        return self.budget.queries - len(self.rows)

    def ask(self, prompts: list[str], max_new_tokens: int | None = None) -> list[Completion]:
        """Completions for as many of `prompts` as the budget allows (maybe fewer than asked); `max_new_tokens`:
        a request's own `max_tokens` in place of the harvest's."""
        answers = []
        for start in range(0, len(prompts), self.chunk_size):
            if self.queries_left <= 0 or (self.budget.tokens is not None and self.tokens >= self.budget.tokens):
                break
            chunk = prompts[start:start + min(self.chunk_size, self.queries_left)]
            answers += self._answer_chunk(chunk, max_new_tokens)
        return answers

    def _answer_chunk(self, chunk: list[str], max_new_tokens: int | None = None) -> list[Completion]:
        first = len(self.rows)
        replay = self.stored[first:first + len(chunk)]
        if replay:
            if [r["prompt"] for r in replay] != chunk[: len(replay)]:
                raise HarvestMismatch(f"{self.out_dir}: stored query {first} differs from what the strategy asks "
                                      "now; the strategy or the task changed since this harvest began")
            if len(replay) < len(chunk):
                raise HarvestMismatch(f"{self.out_dir}: a stored shard ends inside a chunk; delete the last shard")
            rows = replay
        else:
            sampling = Sampling(**{**asdict(self.sampling), "seed": (self.sampling.seed or 0) + first,
                                   "max_new_tokens": max_new_tokens or self.sampling.max_new_tokens})
            completions = self.teacher.complete(chunk, sampling)
            rows = [completion_row(first + i, p, c) for i, (p, c) in enumerate(zip(chunk, completions))]
            self._flush(first, rows)
        self.rows += rows
        self.tokens += sum(r["completion_tokens"] for r in rows)
        self.bar.update(len(rows))
        self.bar.set_postfix(tokens=self.tokens)
        return [_completion(r) for r in rows]

    def _flush(self, first: int, rows: list[dict]) -> None:
        final = self.out_dir / "shards" / f"shard-{first:08d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with _quiet_datasets():  # the harvest's own bar is the one to watch, not one per shard saved
            datasets.Dataset.from_list(rows, features=FEATURES).save_to_disk(str(tmp))
        os.replace(tmp, final)

    def close(self) -> datasets.Dataset:
        self.bar.close()
        summary = {"queries": len(self.rows), "completion_tokens": self.tokens}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return datasets.Dataset.from_list(self.rows, features=FEATURES)


@contextmanager
def _quiet_datasets():
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def load_harvest(out_dir: str | Path) -> datasets.Dataset:
    """Every stored row of a harvest, in query order (`out_dir` may be the harvest or the cell holding it)."""
    out_dir = Path(out_dir)
    out_dir = out_dir / "harvest" if (out_dir / "harvest").is_dir() else out_dir
    shards = sorted((out_dir / "shards").glob("shard-*[0-9]"))
    if not shards:
        raise FileNotFoundError(f"{out_dir}: no harvest shards")
    with _quiet_datasets():
        return datasets.concatenate_datasets([datasets.load_from_disk(str(s)) for s in shards]).sort("index")


Strategy = Callable[[Harvester], list[tuple[str, Completion]]]
