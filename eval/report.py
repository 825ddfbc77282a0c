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
from matplotlib.figure import Figure


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


def paired_difference(before: np.ndarray, after: np.ndarray, samples: int = 2000, seed: int = 0) -> dict:
    """Mean of before - after over items scored both ways (e.g. teacher accuracy undefended minus as served),
    with a paired bootstrap 95% interval and the number of items whose score changed."""
    rng = np.random.default_rng(seed)
    diff = np.asarray(before, dtype=float) - np.asarray(after, dtype=float)
    means = [diff[rng.integers(len(diff), size=len(diff))].mean() for _ in range(samples)]
    return {"mean": float(diff.mean()), "ci95": _interval(means), "items_changed": int((diff != 0).sum())}


def _interval(values: list[float]) -> list[float]:
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return [float("nan"), float("nan")]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def budget_to_reach(curve: list[dict], target: float) -> tuple[float, str]:
    """The number of queries at which a leakage curve first reaches transfer `target`, interpolated in log
    queries. A point's queries are those the attacker actually spent (`queries`, which a strategy that runs
    out of things to ask leaves below its budget), else its budget.

    Returns (queries, how): "at" when the curve crosses the target within its points, "below" when it
    already reaches it at its first point (the true number is at most that), "above" when it never does
    (at least its last).
    """
    points = sorted((r.get("queries", r["budget"]), r["transfer"]["mean"]) for r in curve)
    if points[0][1] >= target:
        return float(points[0][0]), "below"
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if t1 >= target:
            share = (target - t0) / (t1 - t0)
            return float(np.exp(np.log(b0) + share * (np.log(b1) - np.log(b0)))), "at"
    return float(points[-1][0]), "above"


def query_multipliers(rows: list[dict], reference: tuple[str, str]) -> list[dict]:
    """For every (defence, attack) curve and every reference budget B: how many queries that attacker needs,
    against that defence, to match the transfer the `reference` (defence, attack) reaches with B, as a
    multiple of B."""
    curves: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        curves.setdefault((r["defense"], r["attack"]), []).append(r)
    out = []
    for b in sorted(curves.get(reference, []), key=lambda r: r["budget"]):
        target, spent = b["transfer"]["mean"], b.get("queries", b["budget"])
        for (defense, attack), curve in curves.items():
            need, how = budget_to_reach(curve, target)
            out.append({"defense": defense, "attack": attack, "reference_budget": b["budget"], "target_tau": target,
                        "queries_needed": need, "multiplier": need / spent, "bound": how})
    return out


def multiplier_table(multipliers: list[dict], reference: tuple[str, str]) -> str:
    budgets = sorted({m["reference_budget"] for m in multipliers})
    lines = [f"Queries needed to match the transfer of {reference[1]} against {reference[0]} at budget B, "
             "as a multiple of B (≤: reached already at the smallest budget measured; ≥: not reached at the "
             "largest):", "",
             "| defence | attack | " + " | ".join(f"B={b}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for key in sorted({(m["defense"], m["attack"]) for m in multipliers}, key=lambda k: (k[1], k[0])):
        cells = []
        for b in budgets:
            m = next(m for m in multipliers if (m["defense"], m["attack"]) == key and m["reference_budget"] == b)
            mark = {"at": "", "below": "≤", "above": "≥"}[m["bound"]]
            cells.append(f"{mark}{m['multiplier']:.2f}×")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_reports(paths: list[str | Path], out_dir: str | Path,
                  reference: tuple[str, str] = ("none", "naive/sft")) -> dict:
    """One report from several evaluations' report.json files (e.g. one per attacker strategy), with
    query multipliers against `reference` when it is among them."""
    rows, metas = [], []
    for path in paths:
        path = Path(path)
        path = path / "report.json" if path.is_dir() else path
        report = json.loads(path.read_text())
        rows += report["rows"]
        metas.append({"source": str(path), **report.get("meta", {})})
    meta = {"merged": metas}
    if any((r["defense"], r["attack"]) == reference for r in rows):
        meta["query_multipliers"] = query_multipliers(rows, reference)
        meta["reference"] = list(reference)
    write_report(rows, out_dir, meta)
    return {"meta": meta, "rows": rows}


def write_study(out_dir: str | Path, report: dict, markdown: str) -> None:
    """A validation study's report.json and report.md, the markdown also printed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown + "\n")
    print(markdown)


def write_report(rows: list[dict], out_dir: str | Path, meta: dict | None = None) -> Path:
    """report.json (the data), report.md (a table) and PNG plots rendered from it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta or {}, "rows": rows}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = markdown_table(rows)
    if len({r["budget"] for r in rows}) > 1:
        markdown += "\n\n" + curve_table(rows)
    if report["meta"].get("query_multipliers"):
        markdown += "\n\n" + multiplier_table(report["meta"]["query_multipliers"], tuple(report["meta"]["reference"]))
    (out_dir / "report.md").write_text(markdown + "\n")
    plot_leakage(rows, out_dir / "leakage.png")
    plot_protection_vs_cost(rows, out_dir / "protection_vs_cost.png")
    return out_dir / "report.json"


def _fmt(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None or not np.isfinite(stat["mean"]):
        return "n/a"
    low, high = stat["ci95"]
    return f"{stat['mean']:.2f} [{low:.2f}, {high:.2f}]"


def _ci(interval: list[float] | None) -> str:
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def markdown_table(rows: list[dict]) -> str:
    lines = ["| defence | attack | budget | seeds | teacher acc | student before | student after | "
             "transfer τ [95% CI] | protection [95% CI] | utility cost |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cost = r.get("utility_cost", {})
        cost_text = f"accuracy −{cost.get('accuracy_drop', 0.0):.3f}"
        cost_text += _ci(cost.get("accuracy_drop_ci95"))
        if "reasoning_shown" in cost:
            cost_text += f", reasoning shown {cost['reasoning_shown']:.0%}"
        note = " (student got worse)" if r["student_after_acc"] < r["student_before_acc"] else ""
        lines.append(f"| {r['defense']} | {r['attack']} | {r['budget']} | {r['seeds']} | {r['teacher_acc']:.3f}"
                     f"{_ci(r.get('teacher_acc_ci95'))} | "
                     f"{r['student_before_acc']:.3f} | {r['student_after_acc']:.3f}{note} | {_fmt(r['transfer'])} | "
                     f"{_fmt(r.get('protection'))} | {cost_text} |")
    return "\n".join(lines)


def curve_table(rows: list[dict]) -> str:
    """The leakage curves as one table per attack: transfer τ (protection) per defence and budget."""
    budgets = sorted({r["budget"] for r in rows})
    blocks = []
    for attack in sorted({r["attack"] for r in rows}):
        lines = [f"Transfer τ (protection) by budget, {attack}; queries spent in brackets where fewer than the "
                 "budget:", "", "| defence | " + " | ".join(f"B={b}" for b in budgets) + " |",
                 "|---|" + "---|" * len(budgets)]
        for defense in dict.fromkeys(r["defense"] for r in rows if r["attack"] == attack):
            cells = []
            for b in budgets:
                r = next((r for r in rows if (r["defense"], r["attack"], r["budget"]) == (defense, attack, b)), None)
                if r is None:
                    cells.append("")
                    continue
                text = f"{r['transfer']['mean']:.2f}"
                if r.get("protection") and r["protection"].get("mean") is not None:
                    text += f" ({r['protection']['mean']:.2f})"
                if r.get("queries", b) < b:
                    text += f" [{r['queries']:,}]"
                cells.append(text)
            lines.append(f"| {defense} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot_leakage(rows: list[dict], path: Path) -> None:
    """Transfer against budget, one line per defence and one panel per attack."""
    attacks = sorted({r["attack"] for r in rows})
    fig = Figure(figsize=(6 * len(attacks), 4))  # no pyplot: no global backend, no figure left open
    axes = fig.subplots(1, len(attacks), sharey=True, squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for defense in dict.fromkeys(r["defense"] for r in rows if r["attack"] == attack):
            line = sorted((r for r in rows if (r["defense"], r["attack"]) == (defense, attack)),
                          key=lambda r: r["budget"])
            x = [r["budget"] for r in line]
            ax.plot(x, [r["transfer"]["mean"] for r in line], marker="o", label=defense)
            ax.fill_between(x, [r["transfer"]["ci95"][0] for r in line], [r["transfer"]["ci95"][1] for r in line],
                            alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("attacker budget (queries)")
        ax.set_title(f"leakage curve: {attack}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("transfer τ")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_protection_vs_cost(rows: list[dict], path: Path) -> None:
    """Protection against what a benign user loses (the share of reasoning withheld when a row reports it,
    else the teacher accuracy lost as served), one point per defended row."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
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
