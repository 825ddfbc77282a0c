"""Transfer, protection and their bootstrap intervals; the JSON report and what is rendered from it.

    transfer   tau = (acc(S_after) - acc(S_before)) / (acc(T as served) - acc(S_before))
    protection     = 1 - tau_D / tau_none, over the same seeds and queries

Intervals resample evaluation items and seeds together (a paired bootstrap: every model is scored
on the same resampled items).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def transfer(student_after: float, student_before: float, teacher: float) -> float:
    """Share of the teacher's advantage over the untrained student that distillation moved across.

    Negative when distillation made the student worse; NaN when the teacher is no better than the student.
    """
    gap = teacher - student_before
    return (student_after - student_before) / gap if gap > 0 else float("nan")


def protection(tau_defended: float, tau_undefended: float) -> float:
    return 1 - tau_defended / tau_undefended if tau_undefended > 0 else float("nan")


@dataclass
class Outcome:
    """Per-item correctness (items x seeds) of the teacher as served and of the student before and after."""

    teacher: np.ndarray
    before: np.ndarray
    after: np.ndarray

    def tau(self, items: np.ndarray | slice = slice(None), seeds: np.ndarray | slice = slice(None)) -> float:
        t, b, a = (m[items][:, seeds].mean() for m in (self.teacher, self.before, self.after))
        return transfer(a, b, t)


def bootstrap_tau(outcome: Outcome, reference: Outcome | None = None, samples: int = 2000,
                  seed: int = 0) -> dict:
    """Mean transfer (and protection against `reference`, the undefended outcome) with 95% intervals."""
    rng = np.random.default_rng(seed)
    n_items, n_seeds = outcome.after.shape
    taus, prots = [], []
    for _ in range(samples):
        items, seeds = rng.integers(n_items, size=n_items), rng.integers(n_seeds, size=n_seeds)
        tau = outcome.tau(items, seeds)
        taus.append(tau)
        if reference is not None:
            prots.append(protection(tau, reference.tau(items, seeds)))
    result = {"transfer": {"mean": outcome.tau(), "ci95": _interval(taus)}}
    if reference is not None:
        result["protection"] = {"mean": protection(outcome.tau(), reference.tau()), "ci95": _interval(prots)}
    return result


def _interval(values: list[float]) -> list[float]:
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return [float("nan"), float("nan")]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def write_report(rows: list[dict], out_dir: str | Path, meta: dict | None = None) -> Path:
    """report.json (the data), report.md (a table) and PNG plots rendered from it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta or {}, "rows": rows}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown_table(rows) + "\n")
    plot_leakage(rows, out_dir / "leakage.png")
    plot_protection_vs_cost(rows, out_dir / "protection_vs_cost.png")
    return out_dir / "report.json"


def _fmt(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None or not np.isfinite(stat["mean"]):
        return "n/a"
    low, high = stat["ci95"]
    return f"{stat['mean']:.2f} [{low:.2f}, {high:.2f}]"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| defence | attack | budget | seeds | teacher acc | student before | student after | "
             "transfer τ [95% CI] | protection [95% CI] | utility cost |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cost = r.get("utility_cost", {})
        cost_text = f"accuracy −{cost.get('accuracy_drop', 0.0):.3f}"
        if "reasoning_shown" in cost:
            cost_text += f", reasoning shown {cost['reasoning_shown']:.0%}"
        note = " (student got worse)" if r["student_after_acc"] < r["student_before_acc"] else ""
        lines.append(f"| {r['defense']} | {r['attack']} | {r['budget']} | {r['seeds']} | {r['teacher_acc']:.3f} | "
                     f"{r['student_before_acc']:.3f} | {r['student_after_acc']:.3f}{note} | {_fmt(r['transfer'])} | "
                     f"{_fmt(r.get('protection'))} | {cost_text} |")
    return "\n".join(lines)


def plot_leakage(rows: list[dict], path: Path) -> None:
    """Transfer against budget, one line per (defence, attack)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["defense"], r["attack"]) for r in rows}):
        line = sorted((r for r in rows if (r["defense"], r["attack"]) == key), key=lambda r: r["budget"])
        x = [r["budget"] for r in line]
        y = [r["transfer"]["mean"] for r in line]
        low = [r["transfer"]["ci95"][0] for r in line]
        high = [r["transfer"]["ci95"][1] for r in line]
        ax.plot(x, y, marker="o", label=f"{key[0]} / {key[1]}")
        ax.fill_between(x, low, high, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("attacker budget (queries)")
    ax.set_ylabel("transfer τ")
    ax.set_title("leakage curve")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_protection_vs_cost(rows: list[dict], path: Path) -> None:
    """Protection against what a benign user loses (the share of reasoning withheld when a row reports it,
    else the teacher accuracy lost as served), one point per defended row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    withheld = all("reasoning_shown" in r.get("utility_cost", {}) for r in rows)
    for r in rows:
        if r.get("protection") is None:
            continue
        cost = r.get("utility_cost", {})
        x = 1 - cost["reasoning_shown"] if withheld else cost.get("accuracy_drop", 0.0)
        ax.scatter(x, r["protection"]["mean"])
        ax.annotate(f"{r['defense']} @{r['budget']}", (x, r["protection"]["mean"]), fontsize=7)
    ax.set_xlabel("reasoning withheld from benign users (share of words)" if withheld
                  else "utility cost (teacher accuracy drop as served)")
    ax.set_ylabel("protection")
    ax.set_title("protection vs utility cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
