"""Every committed evaluation report re-derives from its committed cells.

`evaluate` writes one `runs/CELL/cell.json` per (defence, budget, seed): the per-item correctness of the
student before and after, the queries spent, and the `training_key` of the student, whose scores are cached
as `student-KEY.json`. A report whose cells are missing (say, hidden by .gitignore) cannot be re-derived.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

RESULTS = Path(__file__).resolve().parents[1] / "eval" / "results"


def evaluation_reports() -> list[Path]:
    """report.json files written by `evaluate` (merged reports and study summaries have no cells of their own)."""
    return [p for p in sorted(RESULTS.rglob("report.json"))
            if "attack" in json.loads(p.read_text()).get("meta", {})]


def cell_dir(report: Path, row: dict, seed: int) -> Path:
    strategy, mode = row["attack"].split("/")
    return report.parent / "runs" / f"{row['defense'].replace(':', '-')}-{strategy}-{mode}-b{row['budget']}-s{seed}"


def test_the_studies_have_evaluation_reports():
    assert len(evaluation_reports()) >= 9  # redaction x2, watermark groups x5, traffic protection x2


@pytest.mark.parametrize("report", evaluation_reports(), ids=lambda p: str(p.parent.relative_to(RESULTS)))
def test_every_row_is_the_mean_of_its_committed_cells(report):
    students = {p.name for p in RESULTS.rglob("student-*.json")}
    for row in json.loads(report.read_text())["rows"]:
        cells = [json.loads((cell_dir(report, row, seed) / "cell.json").read_text()) for seed in range(row["seeds"])]
        assert np.mean([np.mean(c["after"]) for c in cells]) == pytest.approx(row["student_after_acc"], abs=1e-12)
        assert np.mean([np.mean(c["before"]) for c in cells]) == pytest.approx(row["student_before_acc"], abs=1e-12)
        assert int(np.mean([c["queries"] for c in cells])) == row["queries"]
        assert all(f"student-{c['training_key']}.json" in students for c in cells), row
