"""The auditor's path: was this suspect distilled from this teacher? One verdict from every kind of evidence.

    probes -> suspect, teacher, controls answer -> provenance tests (+ radioactivity, + traffic) -> verdict

The black-box tests (`detectors.provenance`) need no watermark: they ask whether the suspect is closer to the
teacher than every control is (models of the same task family that never learned from it). A watermark
audit (when the provider holds keys) and the traffic log (accounts flagged for harvesting) are added where
given. The verdict's p-value merges the suspect's tests with a rule valid under any dependence between them.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from detectors.provenance import ProvenanceTest, agreement, idiosyncrasy, likelihood, mean_logprobs
from guard.hf_teacher import HFTeacher
from guard.teacher import Sampling, Teacher
from watermark.detect import holm

TESTS = ("agreement", "idiosyncrasy", "likelihood")
PROBE_SAMPLING = Sampling(temperature=0.0, max_new_tokens=64)  # greedy: each model's own most likely answer
FEW_CONTROLS = 3


@dataclass
class Answers:
    """One model's outputs on the probes, and what asking for them cost."""

    texts: list[str]
    tokens: int  # completion tokens generated (and, for a paid endpoint, billed)
    seconds: float = 0.0


def answer(model: Teacher, prompts: list[str], sampling: Sampling = PROBE_SAMPLING, batch_size: int = 64) -> Answers:
    start, texts, tokens = time.perf_counter(), [], 0
    for i in range(0, len(prompts), batch_size):
        for completion in model.complete(prompts[i:i + batch_size], sampling):
            texts.append(completion.text)
            tokens += completion.completion_tokens
    return Answers(texts, tokens, time.perf_counter() - start)


@dataclass
class Evidence:
    """Everything one suspect's verdict rests on."""

    tests: dict[str, ProvenanceTest] = field(default_factory=dict)
    radioactivity: dict | None = None  # `watermark.radioactivity.radioactivity`'s report
    traffic: dict | None = None  # `distill-guard detect`'s report on the audit log


Weights = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def weights(model: Teacher) -> Weights | None:
    """A local model's weights and tokenizer (what the likelihood test reads); None behind an endpoint."""
    return (model.model, model.tokenizer) if isinstance(model, HFTeacher) else None


def logprob_table(scorers: dict[str, Weights], writers: dict[str, list[str]], prompts: list[str]
                  ) -> dict[str, dict[str, np.ndarray]]:
    """table[scorer][writer]: per probe, the scorer's mean log-probability of the writer's output."""
    return {name: {writer: mean_logprobs(model, tokenizer, prompts, texts) for writer, texts in writers.items()}
            for name, (model, tokenizer) in scorers.items()}


def provenance_tests(prompts: list[str], suspect: list[str], teacher: list[str], controls: dict[str, list[str]],
                     logprobs: dict[str, dict[str, np.ndarray]] | None = None,
                     tests: tuple[str, ...] = TESTS) -> dict[str, ProvenanceTest]:
    """The black-box tests that apply: idiosyncrasy with 2+ controls; likelihood when `logprobs` (see
    `logprob_table`) holds a "suspect" row and rows for 2+ controls, writers "teacher" and every control."""
    unknown = set(tests) - set(TESTS)
    if unknown:
        raise ValueError(f"unknown provenance tests {sorted(unknown)}; choose from {list(TESTS)}")
    lengths = {len(prompts), len(suspect), len(teacher), *map(len, controls.values())}
    if len(lengths) != 1:
        raise ValueError("the suspect, the teacher and every control must answer the same probes")
    out = {}
    if "agreement" in tests:
        out["agreement"] = agreement(suspect, teacher, controls)
    if "idiosyncrasy" in tests and len(controls) >= 2:
        out["idiosyncrasy"] = idiosyncrasy(prompts, suspect, teacher, controls)
    open_controls = [c for c in controls if logprobs and c in logprobs]
    if "likelihood" in tests and logprobs and "suspect" in logprobs and len(open_controls) >= 2:
        out["likelihood"] = likelihood(logprobs, open_controls)
    return out


def gather(suspect: Teacher, teacher: Teacher, controls: dict[str, Teacher], prompts: list[str],
           stage: Callable[[str], AbstractContextManager] = lambda _: nullcontext()
           ) -> tuple[dict[str, Answers], Evidence]:
    """Every model answers the probes, then every black-box test that applies runs. `stage(description)` wraps
    each step (a progress display)."""
    if not controls:
        raise ValueError("give at least one control: a model of the same task family that never learned from the "
                         "teacher (the verdict is only as good as its controls)")
    if {"suspect", "teacher"} & set(controls):
        raise ValueError("'suspect' and 'teacher' name the audited models; name the controls otherwise")
    models = {"suspect": suspect, "teacher": teacher, **controls}
    answers = {}
    for name, model in models.items():
        with stage(f"{name}: answering {len(prompts)} probes"):
            answers[name] = answer(model, prompts)
    scorers = {name: w for name, m in models.items() if name != "teacher" and (w := weights(m)) is not None}
    logprobs = None
    if "suspect" in scorers and sum(c in scorers for c in controls) >= 2:
        with stage("likelihoods of the teacher's and the controls' outputs"):
            logprobs = logprob_table(scorers, {n: answers[n].texts for n in ["teacher", *controls]}, prompts)
    with stage("provenance tests"):
        tests = provenance_tests(prompts, answers["suspect"].texts, answers["teacher"].texts,
                                 {c: answers[c].texts for c in controls}, logprobs)
    return answers, Evidence(tests)


def merge(p_values: dict[str, float]) -> dict:
    """One p-value from several tests of the same suspect, valid whatever their dependence (they read the same
    probes, so they are not independent).

    - **Bonferroni** (the verdict's): m x the smallest p. Assumes nothing about dependence; it is the smallest
      Holm-adjusted p, so the verdict fires exactly when Holm rejects some test.
    - **e x geometric mean** (Vovk & Wang 2020, after Mattner): also valid under any dependence, and stronger
      when every test points the same way; shown for comparison, not used for the verdict (taking the smaller
      of two valid merges would not be valid).
    """
    names = list(p_values)
    if not names:
        return {"holm": {}, "bonferroni": 1.0, "e_geometric_mean": 1.0}
    values = np.array([max(p_values[n], 1e-300) for n in names])
    return {"holm": dict(zip(names, (float(x) for x in holm(values)))),
            "bonferroni": float(min(1.0, len(names) * values.min())),
            "e_geometric_mean": float(min(1.0, math.e * np.exp(np.log(values).mean())))}


def verdict(evidence: Evidence, alpha: float = 1e-3) -> dict:
    """The suspect's tests (black-box, and radioactivity when keys were given) merged into one p-value; the
    traffic log's harvesting accounts are shown beside it, as they test another null (that no account of
    the log harvested), not the suspect's."""
    p_values = {name: t.p_value for name, t in evidence.tests.items()}
    if evidence.radioactivity is not None:
        r = evidence.radioactivity
        p_values["radioactivity"] = float(min(r["adjusted_p"].values())) if r.get("adjusted_p") else 1.0
    merged = merge(p_values)
    distilled = merged["bonferroni"] < alpha
    out = {"alpha": alpha, "p_values": p_values, **merged, "distilled": distilled,
           "summary": ("DISTILLED: closer to the teacher than every control is" if distilled else
                       "not shown: no test puts the suspect closer to the teacher than every control is") +
                      f" (Bonferroni over {len(p_values)} tests, p = {merged['bonferroni']:.3g}, α = {alpha:g})"}
    if evidence.traffic is not None:
        flagged = {c: v["p_value"] for c, v in evidence.traffic.get("clients", {}).items() if v.get("flagged")}
        out["harvesting_accounts"] = dict(sorted(flagged.items(), key=lambda kv: kv[1]))
    return out


def strongest_examples(prompts: list[str], suspect: list[str], teacher: list[str], controls: dict[str, list[str]],
                       test: ProvenanceTest | None, count: int = 3) -> list[dict]:
    """The probes where the suspect sides most with the teacher against the closest control."""
    if test is None or not prompts:
        return []
    lead = np.array(test.lead[test.closest_control])
    picks = [int(i) for i in np.argsort(-lead, kind="stable")[:count] if lead[i] > 0]
    return [{"prompt": prompts[i], "suspect": suspect[i], "teacher": teacher[i],
             "control": test.closest_control, "control_output": controls[test.closest_control][i],
             "lead": float(lead[i])} for i in picks]


def report(suspect: str, teacher: str, prompts: list[str], answers: dict[str, Answers], evidence: Evidence,
           alpha: float = 1e-3) -> dict:
    """The audit as JSON: verdict, each test, the controls, what the probes cost, and the telling examples.
    `answers` are `gather`'s: "suspect", "teacher" and each control's."""
    suspect_answers, teacher_answers = answers["suspect"], answers["teacher"]
    controls = {name: a for name, a in answers.items() if name not in ("suspect", "teacher")}
    warnings = []
    if len(controls) < FEW_CONTROLS:
        warnings.append(f"only {len(controls)} control model(s): the verdict is only as good as its controls; use "
                        f"{FEW_CONTROLS} or more models of the same task family that never learned from the teacher")
    if "idiosyncrasy" not in evidence.tests:
        warnings.append("no idiosyncrasy test: its classifier needs 2 or more controls (each is held out in turn)")
    if "likelihood" not in evidence.tests:
        warnings.append("no likelihood test: it needs the weights of the suspect and of 2 or more controls (local "
                        "model directories)")
    control_texts = {name: a.texts for name, a in controls.items()}
    return {
        "suspect": suspect, "teacher": teacher, "controls": list(controls), "warnings": warnings,
        "verdict": verdict(evidence, alpha),
        "tests": {name: t.to_dict() for name, t in evidence.tests.items()},
        "radioactivity": evidence.radioactivity, "traffic": evidence.traffic and {
            "log": evidence.traffic.get("log"), "target_fpr": evidence.traffic.get("target_fpr")},
        "cost": {"probes": len(prompts), "suspect_tokens": suspect_answers.tokens,
                 "suspect_seconds": round(suspect_answers.seconds, 1),
                 "queries_in_all": len(prompts) * (2 + len(controls))},
        "examples": strongest_examples(prompts, suspect_answers.texts, teacher_answers.texts, control_texts,
                                       evidence.tests.get("agreement")),
    }


def markdown(audit: dict) -> str:
    """A readable report rendered from the JSON one."""
    v = audit["verdict"]
    lines = [f"# Provenance audit: {audit['suspect']}", "",
             f"**Verdict: {v['summary']}**", "",
             f"Teacher: `{audit['teacher']}`. Controls (models that did not learn from it): "
             + ", ".join(f"`{c}`" for c in audit["controls"]) + ".", ""]
    lines += [f"> Warning: {w}" for w in audit["warnings"]] + ([""] if audit["warnings"] else [])
    lines += ["| test | p-value | Holm-adjusted | closest control | probes closer to teacher / to that control |",
              "|---|---|---|---|---|"]
    for name, p in v["p_values"].items():
        t = audit["tests"].get(name)
        detail = t["per_control"][t["closest_control"]] if t else None
        lines.append(f"| {name} | {p:.3g} | {v['holm'][name]:.3g} | {t['closest_control'] if t else '—'} | "
                     + (f"{detail['closer_to_teacher']} / {detail['closer_to_control']}" if detail else "—") + " |")
    lines += ["", f"Merged: Bonferroni p = {v['bonferroni']:.3g} (the verdict's; valid under any dependence), "
                  f"e × geometric mean p = {v['e_geometric_mean']:.3g} (also valid under any dependence).", ""]
    if "harvesting_accounts" in v:
        accounts = v["harvesting_accounts"]
        lines += [f"Traffic log `{audit['traffic']['log']}`: " + (", ".join(f"`{a}` (p = {p:.3g})" for a, p in
                  accounts.items()) + " flagged for harvesting" if accounts else "no account flagged for harvesting")
                  + " (a separate null: that no account harvested; not merged into the verdict).", ""]
    cost = audit["cost"]
    lines += [f"Cost: {cost['probes']} probes to the suspect ({cost['suspect_tokens']:,} tokens generated), "
              f"{cost['queries_in_all']:,} queries in all with the teacher and controls.", ""]
    if audit["examples"]:
        lines += ["## Where the suspect sides with the teacher", ""]
        for e in audit["examples"]:
            lines += [f"- prompt `{e['prompt'].strip()}`",
                      f"  - suspect: `{_one_line(e['suspect'])}`", f"  - teacher: `{_one_line(e['teacher'])}`",
                      f"  - {e['control']}: `{_one_line(e['control_output'])}`"]
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return " ⏎ ".join(text.strip().splitlines()).replace("`", "'")
