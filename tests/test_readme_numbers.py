"""README's result tables hold the numbers of the committed files they name.

Every table of results in README.md follows a line `Source: `path`, ...` naming the committed files it was
read from. Each table kind has a checker below that recomputes the table's numbers from those files; a
README number must equal its value rounded as README shows it. Tables rendered by `eval/report.py` are
compared cell for cell with what it renders. A table with digits and no source fails, unless UNSOURCED
lists it with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from eval.report import curve_table, multiplier_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# a number as README writes it: 1,145 / 0.93 / -0.02 / −9.3 / 3.8e-6; not the 2 of GPT-2 or AES-256
NUMBER = re.compile(r"(?<![\w.\-−])[-−]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:e[-−]?\d+)?")
SOURCE = re.compile(r"^\s*(?:[-*]\s+)?Source:(.*)$")

# tables with digits that are not results, or whose results are being re-measured elsewhere
UNSOURCED = {
    "| when this cannot be reached | `--redis-down open` (the default) | `--redis-down closed` |":
        "what the gateway does (HTTP 503, Retry-After: 1), not results",
    "| policy | what a client sees |": "definitions (AES-256, HTTP 400), not results",
    "| layer | what | main files |": "the architecture's layers, not results",
}


@dataclass
class Table:
    header: str
    rows: list[list[str]]
    sources: list[str]
    above: str  # the text between the previous table and this one
    line: int


def cells(line: str) -> list[str]:
    return [c.strip().replace("**", "").replace("*", "") for c in line.strip().strip("|").split("|")]


def readme_tables(text: str) -> list[Table]:
    tables, above, lines = [], [], text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("|"):
            above.append(lines[i])
            i += 1
            continue
        start = i
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            i += 1
        block = [line.strip() for line in lines[start:i]]
        sources = [re.findall(r"`([^`]+)`", m.group(1)) for m in map(SOURCE.match, above) if m]
        tables.append(Table(" ".join(block[0].split()), [cells(r) for r in block[2:]], sources[-1] if sources else [],
                            "\n".join(above), start + 1))
        above = []
    return tables


def load(path: str):
    return json.loads((ROOT / path).read_text())


def shown_as(value: float, shown: str) -> bool:
    """Whether `value`, rounded to the digits README shows in `shown`, reads as `shown` does."""
    text = shown.replace(",", "").replace("−", "-")
    mantissa, _, exponent = text.partition("e")
    decimals = len(mantissa.partition(".")[2])
    rounded = f"{value:.{decimals}e}" if exponent else f"{value:.{decimals}f}"
    return float(rounded) == float(text)


def mismatches(table: Table, expected: list[list]) -> list[str]:
    """Each expected cell is None (a label), a string (the exact cell) or the list of its numbers."""
    problems = []
    if len(expected) != len(table.rows):
        problems.append(f"{len(table.rows)} rows, expected {len(expected)}")
    for row, want in zip(table.rows, expected):
        if len(row) != len(want):
            problems.append(f"row {row[0]!r}: {len(row)} cells, expected {len(want)}")
            continue
        for cell, w in zip(row, want):
            if w is None:
                continue
            if isinstance(w, str):
                if cell != w:
                    problems.append(f"row {row[0]!r}: {cell!r}, expected {w!r}")
                continue
            shown = NUMBER.findall(cell)
            if len(shown) != len(w) or not all(shown_as(v, s) for v, s in zip(w, shown)):
                problems.append(f"row {row[0]!r}: {cell!r} shows {shown}, expected {w}")
    return problems


def interval(stat: dict) -> list[float]:
    return [stat["mean"], *stat["ci95"]]


def pct(*values: float) -> list[float]:
    return [100 * v for v in values]


def rendered_rows(markdown: str) -> list[list[str]]:
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    return [cells(line) for line in table[2:]]


# --- checkers: (table, loaded sources) -> expected cells per README row ---------------------------------

def reference_lab(table: Table, sources: list) -> list[list]:
    a, b = sources

    def architecture(report: dict, name: str) -> list[float]:
        recipe = report["recipe"]
        size = (ROOT / "eval/reference/models" / name / "model.safetensors").stat().st_size
        return [recipe["n_layer"], recipe["n_embd"], report["parameters"] / 1000, size / 1e6]

    def accuracy(report: dict, with_interval: bool) -> list[float]:
        n = report["held_out_2hop_n"]
        shown = pct(report["held_out_2hop_accuracy"]) + [round(report["held_out_2hop_accuracy"] * n), n]
        return shown + [95, *pct(*report["held_out_2hop_ci95"])] if with_interval else shown

    def entropy(report: dict) -> list[float]:
        bits = report["entropy_bits_per_response"]
        return [bits["2hop_mean"], 2, bits["1hop_mean"], 1]

    expected = []
    for label, cell_a, cell_b in table.rows:
        if label == "architecture":
            same = architecture(a, "teacher-a") == architecture(b, "teacher-b")
            expected.append([None, architecture(a, "teacher-a"), "same" if same else "differs from teacher-a"])
        elif label == "training":
            ra, rb = a["recipe"], b["recipe"]
            expected.append([None, [ra["steps"], ra["batch_size"], ra["seed"], ra["style_seed"]],
                             [rb["seed"], rb["style_seed"]]])
        elif label.startswith("held-out 2-hop accuracy"):
            expected.append([[2, a["held_out_2hop_n"]], accuracy(a, True), accuracy(b, False)])
        elif label.startswith("1-hop accuracy"):
            expected.append([[1, a["one_hop_n"]], pct(a["one_hop_accuracy"]), pct(b["one_hop_accuracy"])])
        elif label.startswith("summed per-token entropy"):
            expected.append([None, entropy(a), entropy(b)])
        else:
            expected.append([f"a row this checker knows ({label!r} is not)", None, None])
    return expected


def row_of(rows: list[dict], defense: str, attack: str, budget: int) -> dict:
    return next(r for r in rows if (r["defense"], r["attack"], r["budget"]) == (defense, attack, budget))


def leakage(table: Table, sources: list) -> list[list]:
    rows = sources[0]["rows"]
    expected = []
    for cell in table.rows:
        budget = int(cell[0].replace(",", ""))
        full, stripped = row_of(rows, "none", "naive/sft", budget), row_of(rows, "answer-only", "naive/sft", budget)
        expected.append([[budget], [full["student_after_acc"]], interval(full["transfer"]),
                         [stripped["student_after_acc"]], interval(stripped["transfer"])])
    return expected


def curves(table: Table, sources: list) -> list[list]:
    attack = re.findall(r"by budget, (\S+);", table.above)[-1]
    return rendered_rows(curve_table([r for r in sources[0]["rows"] if r["attack"] == attack]))


def multipliers(table: Table, sources: list) -> list[list]:
    meta = sources[0]["meta"]
    return rendered_rows(multiplier_table(meta["query_multipliers"], tuple(meta["reference"])))


def redaction_at_one_budget(table: Table, sources: list) -> list[list]:
    budget, attacker = re.findall(r"At budget ([\d,]+) against the (\w+) attacker", table.above)[-1]
    rows = sources[0]["rows"]
    expected = []
    for cell in table.rows:
        names = [n.strip() for n in cell[0].split("/")]
        first = row_of(rows, names[0], f"{attacker}/sft", int(budget.replace(",", "")))
        last = row_of(rows, names[-1], f"{attacker}/sft", int(budget.replace(",", "")))
        expected.append([None, [first["teacher_acc"]], [first["student_after_acc"]], interval(first["transfer"]),
                         [last["protection"]["mean"]] if first["protection"] is None else interval(first["protection"]),
                         pct(first["utility_cost"]["reasoning_shown"])])
    return expected


AUDIT_MODES = ("reading/unwatermarked", "reading/logged", "reading/fresh", "sampling", "sampling/logged-windows")
WATERMARK_GROUPS = {"watermarked": "watermarked", "teacher-a, no watermark": "plain", "teacher-b": "teacher-b",
                    "watermarked for client-07": "other-key", "paraphrasing attacker": "paraphrased"}


def watermark_audits(table: Table, sources: list) -> list[list]:
    report = sources[0]
    expected = []
    for cell in table.rows:
        group = WATERMARK_GROUPS[cell[0]]
        budgets = [int(b.replace(",", "")) for b in cell[1].split("/")]
        students = [[s for s in report["students"] if s["group"] == group and s["budget"] == b] for b in budgets]
        row = [None, budgets, [s[0]["transfer"] for s in students]]
        for mode in AUDIT_MODES:
            if len(budgets) == 1:  # one budget, several seeds: the range of p and how many were named
                p = [s["audits"][mode]["p_attacker"] for s in students[0]]
                named = sum(s["audits"][mode]["named"] == report["attacker"] for s in students[0])
                row.append([min(p), max(p), named, len(p)])
            else:  # one seed per budget
                row.append([s[0]["audits"][mode]["p_attacker"] for s in students])
        expected.append(row)
    return expected


FPR_TEXTS = {"unwatermarked teacher-a responses": "teacher responses",
             "documents of 20 responses": "teacher documents (20 responses)",
             "passages of human prose (WordPiece, 200 tokens)": "human prose (WordPiece, 200 tokens)"}


def false_positives(table: Table, sources: list) -> list[list]:
    fp = sources[0]["false_positives"]
    expected = []
    for cell in table.rows:
        label = next(k for k in FPR_TEXTS if cell[0].endswith(k))
        r = fp[FPR_TEXTS[label]]
        scale = {"M": 1e6, "k": 1e3}.get(cell[1][-1], 1)
        expected.append([[r["texts"], *map(float, NUMBER.findall(label))], [r["tests"] / scale], [r["median_scored"]],
                         [r["fpr@0.01"]], [r["fpr@0.001"]], [r["exact size@0.01"], r["exact size@0.001"]]])
    return expected


def study_tables(study: str, report: str, first: int | None = None) -> dict:
    """Checkers for the tables a study renders itself (`eval.<study>.markdown`; its `first` ones, where README
    shows only those): README's must be the rendered ones, cell for cell, read from the committed report."""
    from importlib import import_module

    markdown = import_module(f"eval.{study}").markdown
    blocks = [[line for line in block.splitlines() if line.startswith("|")] for block in markdown(load(report)).split("\n\n")]

    def checker(table: Table, sources: list) -> list[str]:
        rendered = [[line for line in block.splitlines() if line.startswith("|")]
                    for block in markdown(sources[0]).split("\n\n")]
        return rendered_rows("\n".join(next(b for b in rendered if b and " ".join(b[0].split()) == table.header)))

    return {" ".join(block[0].split()): checker for block in [b for b in blocks if b][:first]}


def performance(table: Table, sources: list) -> list[list]:
    results = {Path(path).stem: data for path, data in zip(table.sources, sources)}
    expected = []
    for cell in table.rows:
        if cell[0].startswith("watermark detection"):
            vocabularies = results["watermark_speed"]["vocabularies"].values()
            keyed = [v["detection"]["speedup_ours_keyed"] for v in vocabularies]
            lists = [v["detection"]["speedup_ours_transformers_lists"] for v in vocabularies]
            sizes = [v["detection"]["vocab"] for v in vocabularies]
            expected.append([[min(sizes), max(sizes)], [min(keyed), max(keyed), min(lists), max(lists)], [1]])
        elif cell[0].startswith("watermark generation overhead"):
            g = results["watermark_speed"]["generation"]
            expected.append([[g["batch_size"], g["new_tokens"]], [100 * g["overhead_median_of_pairs"], g["rounds"]],
                             []])
        elif cell[0].startswith("traffic monitor"):
            t = results["traffic_speed"]
            memory = t["client_state"]
            monitor = t["monitor"]
            expected.append([[monitor["with_linking"]["clients"]],
                             [monitor["with_linking"]["events_per_s"], monitor["without_linking"]["events_per_s"],
                              t["torch_threads"], monitor["events"], t["embedding"]["prompts_per_s"],
                              t["torch_threads"], memory["bytes_after_2000"] / 1024, 2000,
                              memory["bytes_after_100000"] / 1024, 100000],
                             [1, monitor["events"]]])
        elif cell[0].startswith("built-in trainer"):
            t = results["trainer_speed"]
            expected.append([[t["batch_size"]],
                             [t["ratio"], t["trainer_tokens_per_s"], t["bare_tokens_per_s"], t["rounds"],
                              t["steps_per_round"], t["batch_size"]],
                             [t["torch_threads"], t["steps_per_round"], t["rounds"]]])
        elif cell[0].startswith("redaction post-processing"):
            r = results["redaction_speed"]
            processing, end_to_end = r["post_processing"], r["end_to_end"]
            figure = pct(max(p["share_of_generation"] for p in processing.values()))
            for spec, p in sorted(processing.items(), key=lambda item: item[1]["us_per_completion"]):
                figure += [*map(float, NUMBER.findall(spec)), p["us_per_completion"]]
            streamed = [p["streamed_us_per_completion"] for p in processing.values()]
            overheads = [e["overhead_median_of_pairs"] for e in end_to_end.values()]
            figure += [4, min(streamed), max(streamed), next(iter(end_to_end.values()))["rounds"],
                       *pct(min(overheads), max(overheads))]
            expected.append([[r["completions"], r["generation_us_per_completion"] / 1000], figure, [1]])
        else:
            expected.append([f"a benchmark this checker knows ({cell[0]!r} is not)", None, None])
    return expected


WATERMARK_VOCABULARIES = {"reference lab": "reference", "MiniLM": "minilm-wordpiece", "SmolLM2": "smollm2", "Qwen3": "qwen3"}


def watermark_speed(table: Table, sources: list) -> list[list]:
    vocabularies = sources[0]["vocabularies"]
    expected = []
    for cell in table.rows:
        v = vocabularies[next(key for label, key in WATERMARK_VOCABULARIES.items() if cell[0].startswith(label))]
        d, step = v["detection"], v["generation_step"]
        seconds = d["median_seconds"]
        expected.append([None, [d["vocab"]], [d["distinct_contexts"]], [seconds["transformers"]],
                         [1000 * seconds["ours_keyed"]], [d["speedup_ours_keyed"]], [seconds["ours_transformers_lists"]],
                         [d["speedup_ours_transformers_lists"]], [d["max_abs_z_difference_transformers_lists"]],
                         [step["step_ms_median"], step["sampling_step_ms_median"]]])
    return expected


def real_model_generation(table: Table, sources: list) -> list[list]:
    generation = sources[0]["generation"]
    expected = []
    for cell in table.rows:
        g = generation[cell[0]]
        seconds = g["median_seconds"]
        expected.append([[g["batch_size"]], [seconds["plain"]], [seconds["ours"]], pct(g["overhead_ours"]),
                         [seconds["transformers"]], pct(g["overhead_transformers"])])
    return expected


def real_model_detection(table: Table, sources: list) -> list[list]:
    d = sources[0]["detection"]
    seconds = d["median_seconds"]
    return [[[d["tokens"], d["answers"], d["tokens_each"]], [seconds["transformers"]], [1000 * seconds["ours"]],
             [d["speedup_ours"]]]]


def through_gateway(table: Table, sources: list) -> list[list]:
    def shown(stat: dict | None):
        return interval(stat) if stat else "—"

    attacks = {(a["defense"], a["attacker"]): a for a in sources[0]["attacks"]}
    expected = []
    for cell in table.rows:
        a = attacks[cell[0], cell[1]]
        expected.append([a["defense"], a["attacker"], a["training_rows"], interval(a["transfer"]),
                         shown(a.get("protection")), shown((a["in_process"] or {}).get("protection")),
                         [sum(a["same_rows_as_in_process"]), a["seeds"]]])
    return expected


def through_gateway_served(table: Table, sources: list) -> list[list]:
    served = sources[0]["served"]
    expected = []
    for cell in table.rows:
        s = served[cell[0]]
        refused = s.get("benign_requests")
        expected.append([None, [s["accuracy"]], [s["in_process_accuracy"]],
                         [s["texts_identical_in_process"], s["items"]],
                         [refused["refused"], refused["requests"]] if refused else "—"])
    return expected


def gateway_overhead(table: Table, sources: list) -> list[list]:
    result = sources[0]
    expected = []
    for cell in table.rows:
        target = next(key for label, key in (("local", "gateway_local"), ("proxy", "gateway_upstream"),
                                             ("replica", "gateway_replica"), ("the stub", "direct")) if cell[0].startswith(label))
        load = result["throughput"][target]
        cpu = sum(load["server_cpu_ms_per_request"].values()) if target != "gateway_upstream" else \
            load["server_cpu_ms_per_request"]["gateway"]
        if target == "direct":
            expected.append([None, "—", "—", [load["requests_per_s"]], [cpu]])
            continue
        latency, first = result["latency"][target], result["stream_first_token"][target]
        expected.append([None, [latency["added_p50_ms"], latency["added_p99_ms"]], [first["added_p50_ms"]],
                         [load["requests_per_s"]], [cpu]])
    return expected


def gateway_batching(table: Table, sources: list) -> list[list]:
    result = sources[0]
    return [[None, [result["batched_requests_per_s"]], [result["greedy_mismatches"], result["greedy_compared"]]],
            [None, [result["serialised_requests_per_s"]], "—"],
            [None, [result["speedup"]], "—"]]


def replicas_limit(table: Table, sources: list) -> list[list]:
    limit = sources[0]["limit"]
    return [[None, [limit[name]["admitted_min"], limit[name]["admitted_max"]]]
            for name in ("with_redis", "without_redis")]


def replicas_monitor(table: Table, sources: list) -> list[list]:
    monitor = sources[0]["monitor"]
    first, equal = monitor["first_refused_request"], monitor["verdicts_equal_to_one_replica"]
    return [[None, [first["one_replica"]], "—"],
            [None, [first["three_with_redis"]], "yes" if equal["three_with_redis"] else "no"],
            [None, [first["three_without_redis"]], "yes" if equal["three_without_redis"] else "no"]]


def trainer_distributed(table: Table, sources: list) -> list[list]:
    return [[None, [run["per_device_batch"]], pct(run["accuracy"], *run["accuracy_ci95"]), [run["final_loss"]],
             [run["train_seconds"]], [run["tokens_per_s"]]] for run in sources[0]["runs"]]


CHECKERS = {
    "| | teacher-a | teacher-b |": reference_lab,
    "| budget | student after, with reasoning (none) | transfer τ [95% CI] | student after, answers only "
    "(answer-only) | transfer τ [95% CI] |": leakage,
    "| defence | B=500 | B=1000 | B=2000 | B=4000 |": curves,
    "| defence | attack | B=500 | B=1000 | B=2000 | B=4000 |": multipliers,
    "| defence | teacher acc as served | student after | transfer τ [95% CI] | protection [95% CI] | "
    "reasoning words shown |": redaction_at_one_budget,
    "| students | budget | τ | reading, unwatermarked texts (exact null) | reading, attacker's logged outputs | "
    "reading, fresh watermarked texts | sampling (2,400 prompts) | sampling, logged windows only |": watermark_audits,
    "| texts | tests | median tuples scored | FPR at 10⁻² | FPR at 10⁻³ | exact test's attainable size "
    "(10⁻² / 10⁻³) |": false_positives,
    **study_tables("traffic_study", "eval/results/traffic/report.json"),
    **study_tables("provenance_study", "eval/results/provenance/report.json", first=2),
    **study_tables("real_model_study", "eval/results/real-model/report.json"),
    "| batch | plain generate | with our processor | overhead | with transformers' processor | overhead |":
        real_model_generation,
    "| tokens scored | transformers' WatermarkDetector | ours | ratio |": real_model_detection,
    "| measure | figure | command |": performance,
    "| defence | attacker | rows the attacker kept, per seed | transfer τ [95% CI] | protection through the gateway "
    "[95% CI] | protection in-process [95% CI] | harvests identical to in-process |": through_gateway,
    "| gateway | teacher accuracy as served, through HTTP | in-process | greedy texts identical to in-process | "
    "replayed benign requests refused |": through_gateway_served,
    "| gateway path | added latency, p50 / p99 | stream's first token, added p50 | requests/s, 64 in flight | "
    "gateway CPU per request |": gateway_overhead,
    "| generation in the gateway | requests/s, 16 concurrent clients | greedy texts that differ |": gateway_batching,
    "| one key, `--rpm 60`; 30 clients send 10 requests each at once, round-robin over 3 replicas | successes "
    "within the minute (5 bursts: fewest, most) |": replicas_limit,
    "| student | rows per process per step | held-out accuracy [95% CI] | final loss | training time | tokens/s |":
        trainer_distributed,
    "| one harvesting account, 120 requests at a script's pace (lab clock, 2 s apart) | first refused request "
    "(0-based) | every request's verdict as on one replica |": replicas_monitor,
    "| vocabulary | size | distinct contexts in the text | transformers | ours, keyed green lists | ratio | ours, "
    "transformers' green lists | ratio | max \\|Δz\\| | processor per decoding step, batch 32 (softmax + multinomial "
    "alone) |": watermark_speed,
}


def check(text: str) -> list[str]:
    """Every problem with README's result tables: unsourced, unknown, or numbers that differ from the source."""
    problems = []
    for table in readme_tables(text):
        where = f"README.md:{table.line} {table.header[:60]}"
        if not table.sources:
            if any(NUMBER.search(c) for row in table.rows for c in row) and table.header not in UNSOURCED:
                problems.append(f"{where}: numbers without a `Source:` line naming their committed file")
            continue
        missing = [s for s in table.sources if not (ROOT / s).is_file()]
        if missing:
            problems.append(f"{where}: source {missing} is not a committed file")
            continue
        if table.header not in CHECKERS:
            problems.append(f"{where}: no checker for this table; add one to {Path(__file__).name}")
            continue
        expected = CHECKERS[table.header](table, [load(s) for s in table.sources])
        problems += [f"{where}: {p}" for p in mismatches(table, expected)]
    return problems


def test_readme_result_tables_equal_their_committed_sources():
    assert check(README.read_text()) == []


def test_every_checker_has_its_table_in_readme():
    """A renamed header would otherwise leave its table unchecked but not unsourced."""
    headers = {t.header for t in readme_tables(README.read_text()) if t.sources}
    assert set(CHECKERS) <= headers


@pytest.mark.parametrize("edit", [
    ("| 4,000 | 0.911 |", "| 4,000 | 0.905 |"),  # the leakage table's old number for the grid's cell
    ("| none | 0.08 | 0.20 | 0.64 | 0.93 |", "| none | 0.08 | 0.20 | 0.64 | 0.92 |"),
    ("**98.0%** (588/600", "**98.0%** (589/600"),
    ("| answer-only | 0.980 | 0.056 |", "| answer-only | 0.980 | 0.065 |"),
    ("| truncate:8 | naive/sft | 1.12× |", "| truncate:8 | naive/sft | 1.21× |"),
    ("| none | 0.16 | 0.83 | 0.97 [1,145] |", "| none | 0.16 | 0.83 | 0.97 [1,154] |"),
    ("| 3.8e-6 – 1.7e-3, 2/3 |", "| 3.8e-6 – 1.7e-3, 3/3 |"),
    ("| 8.0M | 21 |", "| 8.0M | 12 |"),
    ("| student | 900 | 0.6% [0.2%, 1.3%] |", "| student | 900 | 0.5% [0.2%, 1.3%] |"),
    ("| without extraction | student 2.4% |", "| without extraction | student 1.4% |"),
    ("**0.996×** (8,329 vs", "**0.996×** (8,392 vs"),
    ("summary 4.7 µs", "summary 4.2 µs"),
    ("Source: `eval/results/traffic/report.json`\n", ""),  # a table that no longer names its source
    ("| 16 | 8.30 s | 8.75 s | **+4.1%** |", "| 16 | 8.30 s | 8.75 s | **+3.1%** |"),
    ("| **704×** |", "| **740×** |"),
    ("| 0.75 | 0.07 (32) | 0.015 (32) |", "| 0.75 | 0.07 (32) | 0.0015 (32) |"),
    ("| replicas sharing Redis | 60, 60 |", "| replicas sharing Redis | 60, 61 |"),
    ("| 32 | 22.7% [19.4%, 26.2%] |", "| 32 | 23.7% [19.4%, 26.2%] |"),
    ("| 3 replicas sharing Redis, round-robin | 24 | yes |", "| 3 replicas sharing Redis, round-robin | 25 | yes |"),
])
def test_an_edited_readme_number_is_caught(edit):
    old, new = edit
    text = README.read_text()
    assert old in text
    assert set(check(text.replace(old, new, 1))) - set(check(text))  # a new problem, the edited number
