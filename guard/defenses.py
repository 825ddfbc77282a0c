"""Defences by name, as the CLI, the server and `evaluate` spell them, built from their parts.

Names join with "+", innermost first: "watermark+answer-only" is Redact(Watermark(teacher)). What a defence
needs beyond its name is passed in, never assumed: the watermark's master secret, the monitor's fitted
detector, the summariser. A missing part is an error that says what to pass. The watermark (torch) and the
monitor (scikit-learn) are imported only by a spec that names them, so a gateway serving neither starts without.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from guard.redaction import POLICIES, Policy, Redact, Sealer, Summarize, parse_policy
from guard.teacher import Teacher

if TYPE_CHECKING:  # in annotations only: a gateway that neither watermarks nor monitors loads neither
    from detectors.detector import TrafficDetector
    from guard.gateway.shared_state import SharedState
    from watermark.kgw import WatermarkConfig

WATERMARKS = ("watermark", "watermark:CLIENT")
DEFENSES = ("none", *POLICIES, *WATERMARKS, "monitor")


@dataclass
class DefenseParts:
    """What defences need beyond their names. `watermark_master`: the provider's master secret (per-account
    keys derive from it); `detector`: a `TrafficDetector` fitted on benign traffic, for the monitor;
    `summarize` and `sealer`: for the summary and sealed policies; `shared`: Redis, when gateway replicas share
    the monitor's state."""

    watermark_master: bytes | None = None
    watermark_config: WatermarkConfig | None = None  # None: `WatermarkConfig()`
    detector: TrafficDetector | None = None
    summarize: Summarize | None = None
    sealer: Sealer | None = None
    shared: SharedState | None = None  # gateway replicas' Redis: the monitor judges all replicas' traffic as one
    marked_reasoning: bool = True  # the model marks where its reasoning ends; see `Policy.marked`


def parse_defense(spec: str) -> list[tuple[str, str]]:
    """(kind, argument) of each layer `spec` names, innermost first; a misspelt name fails here, before any
    model loads."""
    if spec == "none":
        return []
    layers = []
    for part in spec.split("+"):
        kind, _, argument = part.partition(":")
        if kind == "watermark" or (kind == "monitor" and not argument):
            layers.append((kind, argument))
            continue
        if kind == "monitor":
            raise ValueError(f"{part!r}: the monitor takes no settings; the attacker's pace, accounts and cover "
                             "traffic belong to the attack (evaluate --pace/--accounts/--cover)")
        parse_policy(part)  # raises on an unknown policy, listing the known ones
        layers.append(("redact", part))
    if not layers:
        raise ValueError(f"unknown defence {spec!r}; available: {', '.join(DEFENSES)}, or several joined by '+'")
    return layers


def build_defense(spec: str, teacher: Teacher, parts: DefenseParts = DefenseParts()) -> Teacher:
    """The teacher as served under defence `spec` (see `DEFENSES`), innermost layer first."""
    for kind, argument in parse_defense(spec):
        if kind == "watermark":
            if parts.watermark_master is None:
                raise ValueError("the watermark needs the provider's master secret: set $DISTILL_GUARD_WATERMARK_KEY "
                                 "(make one with `distill-guard watermark keygen`) or pass a key file")
            # torch and transformers: heavy, and optional to a gateway that does not watermark
            from watermark.kgw import Watermark, WatermarkConfig
            teacher = Watermark(teacher, parts.watermark_master, parts.watermark_config or WatermarkConfig(),
                                client=argument or None)
        elif kind == "monitor":
            if parts.detector is None:
                raise ValueError("the monitor needs a detector fitted on benign traffic (`distill-guard detect "
                                 "--benign LOG` fits one; the lab has its own)")
            # the detectors (scikit-learn, datasets): heavy, and optional to a gateway without the monitor
            from detectors.monitor import Monitor
            from guard.gateway.shared_monitor import SharedMonitor
            from guard.monitored import Monitored
            monitor = Monitor(parts.detector)
            teacher = Monitored(teacher, monitor if parts.shared is None else SharedMonitor(monitor, parts.shared))
        else:
            teacher = Redact(teacher, parse_policy(argument, parts.summarize, parts.sealer, parts.marked_reasoning))
    return teacher


def split_outer_policy(spec: str, parts: DefenseParts = DefenseParts()) -> tuple[str, Policy | None]:
    """(`spec` without its outermost layer, that layer's policy) when the outermost layer is a redaction, else
    (`spec`, None). A server applies that policy itself, so a stream goes out through its `StreamRedactor`."""
    layers = parse_defense(spec)
    if not layers or layers[-1][0] != "redact":
        return spec, None
    inner, _, outer = spec.rpartition("+")
    return inner or "none", parse_policy(outer, parts.summarize, parts.sealer, parts.marked_reasoning)
