"""The auditor's path without a watermark: black-box provenance tests, their calibration, and one verdict.

Real models throughout: the reference teachers, students distilled by the built-in trainer (through the
example script), and a student served behind the gateway on loopback, read with the official SDK."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import kstest
from typer.testing import CliRunner

from conftest import example_once, live_server
from detectors.provenance import agreement, idiosyncrasy, likelihood, sign_test, word_agreement
from eval.reference.world import reference_task
import guard.audit as audit
from guard import cli
from guard.gateway.app import create_app
from guard.hf_teacher import HFTeacher
from guard.openai_teacher import OpenAITeacher
from guard.teacher import Sampling

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / ".venv" / "bin" / "distill-guard"
PROBES = [i.prompt for i in reference_task().eval_items[:120]]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900)


def test_the_sign_test_is_exact_and_one_sided():
    assert sign_test(np.array([1.0, 2.0, 3.0]))["p_value"] == pytest.approx(1 / 8)
    assert sign_test(np.array([1.0, 0.0, 0.0, 2.0, 3.0]))["p_value"] == pytest.approx(1 / 8)  # ties drop out
    assert sign_test(np.array([-1.0, -2.0, -3.0]))["p_value"] == 1.0  # leading the control is not evidence
    assert sign_test(np.zeros(4))["p_value"] == 1.0
    assert word_agreement("a b c", "a x c d") == pytest.approx(2 * 2 / 7)
    assert word_agreement("okay. a b c", "a b c") == pytest.approx(2 * 3 / 7)  # an extra opener shifts nothing


def sampled(model: HFTeacher, seed: int, prompts=PROBES) -> list[str]:
    return [c.text for c in model.complete(prompts, Sampling(temperature=1.0, seed=seed))]


def greedy(model: HFTeacher) -> list[str]:
    return [c.text for c in model.complete(PROBES, Sampling(temperature=0.0))]


def perturbed(model: HFTeacher, seed: int, std: float = 0.01) -> HFTeacher:
    """A sibling model: the same weights plus Gaussian noise, fluent still, with habits of its own (its greedy
    answer differs from the original's on most probes)."""
    weights, generator = copy.deepcopy(model.model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in weights.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return HFTeacher(f"sibling-{seed}", model=weights, tokenizer=model.tokenizer)


@pytest.fixture(scope="module")
def routed_nulls(teacher_a, teacher_b):
    """Audits in which the null holds exactly, with real models and their own habits. Two models that never
    learned from teacher-a, teacher-b and a perturbed sibling of it, are routed probe by probe by a fair coin:
    the suspect answers each probe with one, the routed control with the other. Suspect and control are then
    exchangeable on every probe, whatever the two models are like, so their per-probe leads are symmetric
    and the routed control's p-value is exactly a sign test's under its null: uniform, and independent from
    one audit (coins) to the next. Two more siblings are the other controls, fixed."""
    models = {"teacher-b": teacher_b, **{f"sibling-{s}": perturbed(teacher_b, s) for s in (1, 2, 3)}}
    texts = {name: greedy(m) for name, m in models.items()} | {"teacher": greedy(teacher_a)}
    table = audit.logprob_table({n: audit.weights(m) for n, m in models.items()}, texts, PROBES)
    pair, fixed = ("teacher-b", "sibling-1"), ["sibling-2", "sibling-3"]
    audits = []
    for k in range(24):
        heads = np.random.default_rng(k).random(len(PROBES)) < 0.5
        suspect = [pair[0] if h else pair[1] for h in heads]  # which model answers each probe
        control = [pair[1] if h else pair[0] for h in heads]

        def routed(who: list[str], table_of) -> list:
            return [table_of(w, i) for i, w in enumerate(who)]

        outputs = {"routed": routed(control, lambda w, i: texts[w][i]), **{f: texts[f] for f in fixed}}
        writers = {"teacher": "teacher", **{f: f for f in fixed}}

        def row(who: list[str]) -> dict[str, np.ndarray]:
            out = {name: np.array(routed(who, lambda w, i: table[w][writer][i])) for name, writer in writers.items()}
            out["routed"] = np.array([table[w][control[i]][i] for i, w in enumerate(who)])
            return out

        logprobs = {"suspect": row(suspect), "routed": row(control), **{f: row([f] * len(PROBES)) for f in fixed}}
        audits.append((routed(suspect, lambda w, i: texts[w][i]), outputs, logprobs))
    return texts["teacher"], audits


def routed_p_values(tests) -> list[float]:
    """Each audit's p-value against its routed control (the IUT's maximum over controls would hide an
    anti-conservative test)."""
    return [t.per_control["routed"]["p_value"] for t in tests]


def calibrated(p: list[float]) -> bool:
    """One-sided KS: only p-values smaller than uniform ones (false accusations) break calibration."""
    return kstest(p, "uniform", alternative="greater").pvalue > 0.01


def test_agreement_p_values_are_calibrated_under_the_null(routed_nulls):
    teacher, audits = routed_nulls
    p = routed_p_values([agreement(suspect, teacher, outputs) for suspect, outputs, _ in audits])
    assert calibrated(p), sorted(p)[:10]


def test_idiosyncrasy_p_values_are_calibrated_under_the_null(routed_nulls):
    """Fails if the suspect and the held-out control are scored unalike, or a tie counts as a lead."""
    teacher, audits = routed_nulls
    p = routed_p_values([idiosyncrasy(PROBES, suspect, teacher, outputs) for suspect, outputs, _ in audits])
    assert calibrated(p), sorted(p)[:10]


def test_likelihood_p_values_are_calibrated_under_the_null(routed_nulls):
    """Fails if the held-out control's own outputs are among those T's is preferred over: a model prefers its
    own greedy output, so the control would look far from T and every suspect closer."""
    _, audits = routed_nulls
    p = routed_p_values([likelihood(logprobs, ["routed", "sibling-2", "sibling-3"]) for *_, logprobs in audits])
    assert calibrated(p), sorted(p)[:10]


def test_a_model_that_learned_the_teachers_habits_is_named(teacher_a, teacher_b):
    teacher = greedy(teacher_a)
    controls = {f"teacher-b/{s}": sampled(teacher_b, s) for s in range(3)}
    like_teacher = sampled(teacher_a, 7)  # the teacher's own distribution, sampled: closer than any control
    assert agreement(like_teacher, teacher, controls).p_value < 1e-3
    assert idiosyncrasy(PROBES, like_teacher, teacher, controls).p_value < 1e-3


def test_merging_is_valid_under_any_dependence_and_says_which_rule():
    merged = audit.merge({"agreement": 1e-4, "idiosyncrasy": 0.5, "likelihood": 0.02})
    assert merged["bonferroni"] == pytest.approx(3e-4)
    assert merged["holm"] == pytest.approx({"agreement": 3e-4, "idiosyncrasy": 0.5, "likelihood": 0.04})
    assert merged["e_geometric_mean"] == pytest.approx(np.e * (1e-4 * 0.5 * 0.02) ** (1 / 3))
    assert audit.merge({"a": 0.9, "b": 0.8})["bonferroni"] == 1.0


def test_the_verdict_keeps_traffic_evidence_beside_the_merged_p_value():
    evidence = audit.Evidence(traffic={"log": "sqlite:///x", "clients": {
        "harvester": {"flagged": True, "p_value": 1e-5}, "alice": {"flagged": False, "p_value": 0.4}}})
    v = audit.verdict(evidence)
    assert v["harvesting_accounts"] == {"harvester": 1e-5}
    assert v["p_values"] == {} and not v["distilled"]  # a harvest in the log says nothing of this suspect


@pytest.fixture(scope="module")
def example_run(run_folder):
    """examples/auditor_provenance.py at a small budget: students of teacher-a and teacher-b, and a ground-truth
    control student, audited on 60 held-out questions. Each attack grades its student on 40 held-out questions,
    not 600: the example reports no grades, and grading three students before and after on 600 took 13 of its
    89 s. 100 steps, not fewer: at 50 the students write nothing but their teacher's openers and closers."""
    return example_once(run_folder, "examples/auditor_provenance.py",
                        ["--budget", "200", "--steps", "100", "--probes", "60", "--eval-items", "40"])


@pytest.mark.slow
def test_example_names_the_student_of_teacher_a_and_not_the_student_of_teacher_b(example_run):
    stdout, _ = example_run
    lines = {line.split(":")[0]: line for line in stdout.splitlines() if line.startswith("student of")}
    assert "DISTILLED from teacher-a" in lines["student of teacher-a"], stdout
    assert "not named" in lines["student of teacher-b"], stdout


@pytest.mark.slow
def test_cli_audit_provenance_names_the_student_of_teacher_a(example_run, tmp_path):
    _, out = example_run
    done = run(str(CLI), "audit", "provenance", "--suspect", str(out / "student-a" / "student"), "--teacher", "reference",
               "--control", "reference:teacher-b", "--control", str(out / "control" / "student"),
               "--probe-count", "60", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["verdict"]["distilled"] and report["verdict"]["bonferroni"] < 1e-3
    assert set(report["tests"]) == {"agreement", "idiosyncrasy", "likelihood"}
    assert any("only 2 control" in w for w in report["warnings"])  # fewer than 3 controls: said, not hidden
    assert report["examples"] and report["cost"]["probes"] == 60 and report["cost"]["suspect_tokens"] > 0
    markdown = (tmp_path / "audit.md").read_text()
    assert "DISTILLED" in markdown and "Where the suspect sides with the teacher" in markdown


def test_a_closed_suspect_is_audited_through_the_gateway(example_run):
    """The suspect is only an HTTP endpoint (the gateway on loopback, read with the official SDK): agreement and
    idiosyncrasy still name it; likelihood, which needs weights, is not run."""
    _, out = example_run
    student = HFTeacher(out / "student-a" / "student")
    controls = {"teacher-b": HFTeacher(ROOT / "eval/reference/models/teacher-b"),
                "ground-truth student": HFTeacher(out / "control" / "student")}
    probes = PROBES[:60]
    with live_server(create_app(lambda: student, "suspect")) as url:
        closed = OpenAITeacher(f"{url}/v1", model="suspect", api_key="unused")
        answers, evidence = audit.gather(closed, HFTeacher(ROOT / "eval/reference/models/teacher-a"), controls, probes)
    assert set(evidence.tests) == {"agreement", "idiosyncrasy"}
    assert all(t.p_value < 1e-3 for t in evidence.tests.values()), {n: t.p_value for n, t in evidence.tests.items()}
    local = [c.text for c in student.complete(probes, audit.PROBE_SAMPLING)]
    assert answers["suspect"].texts == local  # the endpoint answered what the model says
    assert answers["suspect"].tokens == sum(c.completion_tokens for c in student.complete(probes, audit.PROBE_SAMPLING))


def message(output: str) -> str:
    """A CLI error as one line, without the box it is drawn in."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def test_cli_errors_are_clear(tmp_path):
    """In process (typer's runner: the real command, without a fresh interpreter's start-up each time)."""
    def audit_provenance(*args: str):
        return CliRunner().invoke(cli.app, ["audit", "provenance", "--suspect", "reference:teacher-b",
                                            "--out", str(tmp_path), *args])

    done = audit_provenance()
    assert done.exit_code == 2 and "at least one control" in message(done.output) and "Traceback" not in done.output
    bad = tmp_path / "probes.jsonl"
    bad.write_text('{"question": "no prompt field"}\n')
    done = audit_provenance("--control", "eval/reference/models/teacher-b", "--probes", str(bad))
    assert done.exit_code == 2 and '"prompt" field' in message(done.output)
    done = audit_provenance("--control", "reference")
    assert done.exit_code == 2 and "neither the suspect nor the teacher" in message(done.output)


@pytest.mark.slow
def test_cli_audit_report_puts_every_kind_of_evidence_in_one_verdict(example_run, tmp_path):
    """Provenance tests, watermark radioactivity (the lab's keys) and the accounts a `detect` report flagged, in
    one JSON and one Markdown report, for the innocent suspect: a harvest in the log names no one's model."""
    _, out = example_run
    detect_report = tmp_path / "detect.json"
    detect_report.write_text(json.dumps({"log": "sqlite:///gateway.db", "target_fpr": 0.01, "clients": {
        "acct-harvest": {"flagged": True, "p_value": 2e-4, "requests": 900},
        "acct-benign": {"flagged": False, "p_value": 0.6, "requests": 40}}}))
    done = run(str(CLI), "audit", "report", "--suspect", str(out / "student-b" / "student"), "--control",
               "reference:teacher-b", "--control", str(out / "control" / "student"), "--probe-count", "60",
               "--lab-key", "--key", "attacker", "--key", "client-01", "--traffic", str(detect_report),
               "--out", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "audit.json").read_text())
    v = report["verdict"]
    assert set(v["p_values"]) == {"agreement", "idiosyncrasy", "likelihood", "radioactivity"}
    assert not v["distilled"] and v["bonferroni"] > 0.01
    assert v["harvesting_accounts"] == {"acct-harvest": 2e-4}
    markdown = (tmp_path / "report" / "audit.md").read_text()
    assert "acct-harvest" in markdown and "radioactivity" in markdown and "not shown" in markdown
    assert "distill-guard reference lab" not in done.stdout + markdown  # the secret never shows


def test_the_committed_study_rederives_from_its_cells_and_its_nulls_are_calibrated():
    """eval/results/provenance: every cell committed, the summary recomputed from them, and the nulls' p-values
    no smaller than uniform ones (one-sided KS), for each test and the combined verdict."""
    from eval.provenance_study import summarize

    study = ROOT / "eval" / "results" / "provenance"
    report = json.loads((study / "report.json").read_text())
    cells = {p.stem: json.loads(p.read_text()) for p in (study / "cells").glob("*.json")}
    assert {c["suspect"]: c for c in report["cells"]} == cells
    assert json.loads(json.dumps(summarize([cells[c["suspect"]] for c in report["cells"]]))) == report["summary"]
    roles = [c["role"] for c in cells.values()]
    assert roles.count("positive") >= 20 and roles.count("null") >= 20
    for test, summary in report["summary"]["tests"].items():
        assert summary["nulls_ks_uniform"]["p_value"] > 0.01, test
