"""Where the reasoning ends and the answer begins, in the formats models actually use.

Shared by graders (which check the answer) and by defences (which decide what reasoning to show).
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_LINE = re.compile(r"(?im)^[ \t]*answer[ \t]*:[ \t]*(.*)$")


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split a completion into (reasoning, answer); reasoning is None when there is none.

    An unclosed ``<think>`` makes everything after it reasoning, so nothing hidden leaks as answer.
    """
    if THINK_OPEN in text or THINK_CLOSE in text:
        close = text.rfind(THINK_CLOSE)
        if close < 0:
            start = text.find(THINK_OPEN)
            return text[start + len(THINK_OPEN):].strip(), text[:start].strip()
        inner = text[:close]
        start = inner.find(THINK_OPEN)
        reasoning = inner[start + len(THINK_OPEN):] if start >= 0 else inner
        return reasoning.strip(), text[close + len(THINK_CLOSE):].strip()
    if "####" in text:
        head, _, tail = text.rpartition("####")
        return head.strip(), tail.strip()
    lines = list(ANSWER_LINE.finditer(text))
    if lines:
        last = lines[-1]
        return text[: last.start()].strip() or None, last.group(1).strip()
    return None, text.strip()


def has_marker(text: str) -> bool:
    """Whether `text` says where its reasoning ends (or begins): ``<think>``/``</think>``, ``####`` or an
    ``answer:`` line."""
    return THINK_OPEN in text or THINK_CLOSE in text or "####" in text or ANSWER_LINE.search(text) is not None


def delimit(text: str, cut: bool = False, marked: bool = True) -> tuple[str | None, str]:
    """(reasoning, answer) as a policy that withholds reasoning must read them: failing closed. A completion
    without a marker is all reasoning when it was cut short (`finish_reason` "length": the marker may be what was
    cut, and a harvester sets `max_tokens` to cut it) or when the served model always marks its reasoning
    (`marked`: unmarked text from it cannot be told apart from reasoning). Only a finished completion of a model
    that marks nothing (`marked=False`) is all answer."""
    if has_marker(text):
        return split_reasoning(text)
    if cut or marked:
        return text.strip() or None, ""
    return None, text.strip()


def join_reasoning(text: str, reasoning: str | None, answer: str) -> str:
    """`answer` with `reasoning` (None or empty: none) in the format `text` used. With no answer (none was
    generated) there is no answer marker either."""
    if THINK_OPEN in text or THINK_CLOSE in text:
        return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}\n{answer}" if reasoning else answer
    if not answer:
        return reasoning or ""
    marker = "#### " if "####" in text else "answer: "
    return f"{reasoning}\n{marker}{answer}" if reasoning else f"{marker}{answer}"


def restore_reasoning(shown: str, reasoning: str) -> str:
    """The completion a model wrote, from the `shown` text its reasoning was withheld from and that reasoning:
    what the model reads of its own earlier turn. A shown text without a marker lost a ``</think>``
    (`join_reasoning` shows a think-format answer bare); an empty one was all reasoning."""
    if not shown.strip():
        return reasoning
    if has_marker(shown):
        return join_reasoning(shown, reasoning, split_reasoning(shown)[1])
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}\n{shown}"


def strip_reasoning(text: str) -> str:
    """The completion with its reasoning removed, keeping the answer in the same format."""
    reasoning, answer = split_reasoning(text)
    if reasoning is None:
        return text
    return join_reasoning(text, None, answer)
