"""Traffic events: one API request as the detectors see it, and readers for logs of them.

A log is JSONL (one object per line) or an Arrow dataset; the gateway's audit log will feed the same
`Event`s through `events_from_rows`. A bad row is an error naming the file, the row and the problem, or,
with `errors="skip"`, is skipped and counted: never silently.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from itertools import groupby
from typing import Iterable, Iterator, Literal


@dataclass
class Event:
    client: str  # the API key or account the request came from
    time: float  # seconds since the epoch
    prompt: str
    prompt_tokens: int = 0
    response_tokens: int = 0
    endpoint: str = "chat"
    ip: str | None = None  # optional account metadata, for linking accounts
    payment: str | None = None
    response: str | None = None  # what the account was answered, when known: answer chaining reads it


PROMPT_BYTES = 2048  # the most of a prompt the online monitor keeps (UTF-8 bytes)
CUT = " ... "


def compact(event: Event, limit: int = PROMPT_BYTES) -> Event:
    """`event` as the online monitor keeps it: a prompt (and a response) of at most `limit` UTF-8 bytes. A longer prompt has its
    whitespace collapsed, then, if still too long, is cut to its head and tail (an instruction to reason is
    asked for at either end), so a client's sample and the replicas' event stream stay bounded however long
    the prompts sent. Every feature reads the prompt's words (shingles, its key, an instruction to reason), and
    a prompt within the limit, as nearly every benign one is, is kept exactly: online and offline agree."""
    prompt, response = cap(event.prompt, limit), event.response and cap(event.response, limit)
    return event if prompt is event.prompt and response is event.response else replace(event, prompt=prompt,
                                                                                          response=response)


def cap(text: str, limit: int = PROMPT_BYTES) -> str:
    """`text` itself within `limit` UTF-8 bytes; else whitespace collapsed and, if still too long, its head
    and tail."""
    data = text.encode()
    if len(data) <= limit:
        return text
    data = " ".join(text.split()).encode()
    if len(data) > limit:
        head = (limit - len(CUT)) * 3 // 4
        tail = limit - len(CUT) - head
        data = data[:head] + CUT.encode() + data[-tail:]
    # a cut may split a character: its broken bytes are dropped, never replaced (that could outgrow the limit)
    return data.decode(errors="ignore")


class EventFormatError(ValueError):
    """A log row that is not an event; the message names where and why."""


def _time(value) -> float:
    if isinstance(value, bool):
        raise ValueError("time must be seconds since the epoch or an ISO-8601 string, not a boolean")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"time is not finite: {value}")
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise ValueError(f"time {value!r} is neither a number nor an ISO-8601 timestamp") from None
    raise ValueError(f"time must be a number or an ISO-8601 string, got {type(value).__name__}")


def _count(row: dict, name: str) -> int:
    value = row.get(name, 0) or 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise ValueError(f"{name} must be a non-negative whole number, got {value!r}")
    return int(value)


def event_from_row(row) -> Event:
    if isinstance(row, ValueError):
        raise row
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for name in ("client", "time", "prompt"):
        if row.get(name) is None:
            raise ValueError(f"missing required field {name!r}")
    if not isinstance(row["client"], str) or not row["client"]:
        raise ValueError("client must be a non-empty string")
    if not isinstance(row["prompt"], str):
        raise ValueError("prompt must be a string")
    if row.get("response") is not None and not isinstance(row["response"], str):
        raise ValueError("response must be a string when given")
    optional = {k: (str(row[k]) if row.get(k) is not None else None) for k in ("ip", "payment")}
    return Event(client=row["client"], time=_time(row["time"]), prompt=row["prompt"],
                 prompt_tokens=_count(row, "prompt_tokens"), response_tokens=_count(row, "response_tokens"),
                 endpoint=str(row.get("endpoint") or "chat"), response=row.get("response"), **optional)


def events_from_rows(rows: Iterable, source: str = "rows",
                     errors: Literal["raise", "skip"] = "raise") -> tuple[list[Event], int]:
    """Events from dict rows (the seam for the gateway's log), in time order; returns (events, skipped)."""
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    events, skipped = [], 0
    for number, row in enumerate(rows, 1):
        try:
            events.append(event_from_row(row))
        except ValueError as e:
            if errors == "raise":
                raise EventFormatError(f"{source}: row {number}: {e}") from None
            skipped += 1
    events.sort(key=lambda e: e.time)
    return events, skipped


def events_by_client(rows: Iterable, source: str = "rows", errors: Literal["raise", "skip"] = "raise",
                     skipped: list[int] | None = None) -> Iterator[tuple[str, list[Event]]]:
    """Each client's events from dict rows ordered by client, then time: one client's at a time, so that a
    log of any size streams. Bad rows are handled as `events_from_rows` does; `skipped[0]` counts them."""
    skipped = [0] if skipped is None else skipped

    def parsed():
        for number, row in enumerate(rows, 1):
            try:
                yield event_from_row(row)
            except ValueError as e:
                if errors == "raise":
                    raise EventFormatError(f"{source}: row {number}: {e}") from None
                skipped[0] += 1

    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    for client, mine in groupby(parsed(), key=lambda e: e.client):
        yield client, list(mine)


def read_events(path: str | Path, errors: Literal["raise", "skip"] = "raise") -> tuple[list[Event], int]:
    """Events from a JSONL file or an Arrow dataset directory/file; returns (events, rows skipped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such log")
    if path.is_dir() or path.suffix == ".arrow":
        # datasets (and with it torch): heavy, and optional to what reads events from JSONL or a store (the gateway)
        import datasets
        rows = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_file(str(path))
        return events_from_rows(iter(rows), str(path), errors)

    def parsed():
        with path.open() as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    yield ValueError(f"not JSON ({e.msg} at column {e.colno})")  # reported with its row number

    return events_from_rows(parsed(), str(path), errors)


def write_events(events: Iterable[Event], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for e in events:
            out.write(json.dumps(asdict(e)) + "\n")
