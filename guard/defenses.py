"""Defences by name, as the CLI, the server and `evaluate` spell them. Each wraps a Teacher and is one.

Names join with "+", innermost first: "watermark+answer-only" is Redact(Watermark(teacher)).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from guard.redaction import Redact, parse_policy
from guard.teacher import Teacher

REDACTIONS = ("full", "answer-only", "summary", "truncate:K", "sealed")
WATERMARKS = ("watermark", "watermark:CLIENT")
# the rate-pattern monitor, and the shape of the harvester's traffic through it: SECONDS between requests,
# spread over ACCOUNTS accounts (sybil), with COVER benign requests per attack request in each (hydra)
MONITORS = ("monitor", "monitor:SECONDS", "monitor:pace=SECONDS,accounts=N,cover=R")


def parse_defense(spec: str) -> list[Callable[[Teacher], Teacher]]:
    """The wrappers `spec` names, innermost first; a misspelt name fails here, before any model loads."""
    return [] if spec == "none" else [_wrapper(part) for part in spec.split("+")]


def apply_defense(spec: str, teacher: Teacher) -> Teacher:
    """The teacher as served under defence `spec`: none; a redaction policy (full, answer-only, summary,
    truncate:K, sealed); the green-list watermark of client "attacker" or of CLIENT; or several joined by "+"."""
    for wrap in parse_defense(spec):
        teacher = wrap(teacher)
    return teacher


def _wrapper(spec: str) -> Callable[[Teacher], Teacher]:
    kind = spec.split(":")[0]
    if kind == "watermark":
        from watermark.kgw import LAB_MASTER, Watermark, WatermarkKey, master_secret

        client = spec.partition(":")[2] or "attacker"
        key = WatermarkKey.for_client(master_secret(required=False) or LAB_MASTER, client)
        return lambda teacher: Watermark(teacher, key)
    if kind == "monitor":
        shape = _traffic_shape(spec)
        return lambda teacher: _monitored(teacher, **shape)
    if kind not in {r.split(":")[0] for r in REDACTIONS}:
        raise ValueError(f"unknown defence {spec!r}; available: none, {', '.join(REDACTIONS + WATERMARKS + MONITORS)}, "
                         "or several joined by '+'")
    policy = parse_policy(spec)
    return lambda teacher: Redact(teacher, policy)


def _traffic_shape(spec: str) -> dict:
    """monitor, monitor:SECONDS, or monitor:pace=SECONDS,accounts=N,cover=R -> Guarded's keyword arguments."""
    rest = spec.partition(":")[2]
    if not rest:
        return {}
    if "=" not in rest:
        rest = f"pace={rest}"
    names = {"pace": ("interval", float), "accounts": ("accounts", int), "cover": ("cover", float)}
    shape = {}
    for part in rest.split(","):
        key, _, value = part.partition("=")
        if key not in names:
            raise ValueError(f"{spec!r}: unknown monitor setting {key!r}; use pace=SECONDS, accounts=N, cover=R")
        name, kind = names[key]
        try:
            shape[name] = kind(value)
        except ValueError:
            raise ValueError(f"{spec!r}: {key} needs a number, got {value!r}") from None
    if shape.get("interval", 1) <= 0 or shape.get("accounts", 1) < 1 or shape.get("cover", 0) < 0:
        raise ValueError(f"{spec!r}: need pace > 0, accounts >= 1 and cover >= 0")
    return shape


def _monitored(teacher: Teacher, **shape) -> Teacher:
    """A fresh monitor, its detector fitted on the reference lab's simulated benign traffic, before `teacher`."""
    from detectors.monitor import Guarded, Monitor

    return Guarded(teacher, Monitor(_lab_detector()), **shape)


@functools.lru_cache(maxsize=1)
def _lab_detector():
    from detectors.detector import TrafficDetector
    from detectors.simulate import BENIGN_POPULATION, simulate

    benign, _ = simulate(BENIGN_POPULATION, days=3, seed=0)
    return TrafficDetector(use_embeddings=False).fit(benign)
