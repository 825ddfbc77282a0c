"""Defences by name, as the CLI, the server and `evaluate` spell them. Each wraps a Teacher and is one."""

from __future__ import annotations

from guard.redaction import Redact, parse_policy
from guard.teacher import Teacher

REDACTIONS = ("full", "answer-only", "summary", "truncate:K", "sealed")


def apply_defense(spec: str, teacher: Teacher) -> Teacher:
    """The teacher as served under defence `spec`: none, or a redaction policy (full, answer-only, summary,
    truncate:K, sealed)."""
    if spec == "none":
        return teacher
    if spec.split(":")[0] not in {r.split(":")[0] for r in REDACTIONS}:
        raise ValueError(f"unknown defence {spec!r}; available: none, {', '.join(REDACTIONS)}")
    return Redact(teacher, parse_policy(spec))
