"""Speed benchmarks: ratios measured side by side in one run. Each writes its result as a small JSON under
eval/results/benchmarks/, which README's performance figures quote."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results" / "benchmarks"


def write_result(name: str, result: dict, out_dir: str | Path = RESULTS) -> Path:
    """`out_dir/name.json`: the result, with when it ran and how loaded the machine was at the end (other
    jobs on a shared machine slow both sides of a ratio, not the ratio itself, but they do move absolutes)."""
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    context = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load_average": list(os.getloadavg())}
    path.write_text(json.dumps({**result, "measured": context}, indent=2) + "\n")
    return path
