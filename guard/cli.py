"""The one command line: `distill-guard`. The only module that imports from every layer; the reference
lab's defaults (its teachers by name, its benign traffic, its public watermark secret) enter here, and only
where a command is asked for the lab."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers loads: nothing is ever fetched from a model hub

import functools  # noqa: E402
import json  # noqa: E402
import sqlite3  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Annotated  # noqa: E402

import prometheus_client
import psycopg
import typer
import uvicorn
from rich.console import Console
from rich.table import Table

from eval.personas import ATTACKERS, BENIGN
from guard.defenses import DefenseParts, build_defense, parse_defense, split_outer_policy
from guard.gateway.admin import ADMIN_KEY_ENV, DAY
from guard.gateway.app import create_app
from guard.gateway.shared_state import SharedState
from guard.gateway.store import is_store_url, open_store, shown_url
from guard.load import is_remote
from guard.load import load_teacher as load_upstream
from guard.pretrained import PRETRAINED
from guard.redaction import Sealer, parse_policy
from guard.teacher import Caller, ModelLoadError, Sampling

if TYPE_CHECKING:  # in annotations only: guard.audit loads transformers
    import guard.audit as audit

app = typer.Typer(help="Protect a served language model against distillation, and detect it after the fact.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
lab = typer.Typer(help="The reference lab: the built-in world, task and teachers.", no_args_is_help=True)
app.add_typer(lab, name="lab")
watermark_app = typer.Typer(help="Green-list watermarks: keys and detection.", no_args_is_help=True)
app.add_typer(watermark_app, name="watermark")
audit_app = typer.Typer(help="Audits of suspect models.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
traffic_app = typer.Typer(help="Simulated API traffic.", no_args_is_help=True)
app.add_typer(traffic_app, name="traffic")
bench_app = typer.Typer(help="Speed and memory benchmarks: ratios measured side by side in one run, written as JSON "
                             "to eval/results/benchmarks/ (run each with OMP_NUM_THREADS=1).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
keys_app = typer.Typer(help="The gateway's API keys: one per account, with its limits and redaction policy.",
                        no_args_is_help=True)
app.add_typer(keys_app, name="keys")
study_app = typer.Typer(help="The validation studies behind README's results (eval/results/).", no_args_is_help=True)
app.add_typer(study_app, name="study")
console = Console()

TeacherOpt = Annotated[str, typer.Option(help="'reference', 'reference:teacher-b', 'smollm2' (a real model; the "
                                              "`real` extra), a local model directory, or an OpenAI-compatible base URL")]


@app.command()
def demo(teacher: TeacherOpt = "reference", show: int = 4, budget: int = 1000, seeds: int = 1,
         steps: Annotated[int | None, typer.Option(help="student steps; default: scale with the budget")] = None,
         eval_items: int = 600, out: str = "runs/demo", api_key: str | None = None, model: str | None = None,
         max_new_tokens: MaxNewTokensOpt = 64):
    """The reference lab in a few minutes: the teacher reasoning through held-out questions, then a real
    distillation attack (full reasoning vs answers only) and the capability that transfers. With a real
    pretrained model (`--teacher smollm2`): its answers to real requests with and without each defence."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.attack import AttackConfig, evaluate
    from eval.metrics import MostlyRefused, capability
    from eval.reference import load_teacher
    from eval.reference.world import reference_task
    from eval.report import markdown_table, write_report
    from eval.student import StudentConfig
    start = time.perf_counter()
    try:
        chosen = load_teacher(teacher, api_key=api_key, model=model)
    except ModelLoadError as e:
        raise typer.BadParameter(str(e), param_hint="--teacher") from None
    if teacher in PRETRAINED:
        return demo_defenses(chosen)
    task = replace(reference_task(), max_new_tokens=max_new_tokens)
    console.print(f"[bold]reference task[/]: {len(task.eval_items)} held-out 2-hop questions, "
                  f"{len(task.query_pool)} prompts in the attacker's pool; teacher: {chosen.name}")
    try:
        accuracy, completions = capability(chosen, task)
    except MostlyRefused as e:
        raise typer.BadParameter(str(e), param_hint="--max-new-tokens") from None
    table = Table("question", "reasoning (as served)", "answer", "gold", "ok", show_lines=True)
    for item, completion in list(zip(task.eval_items, completions))[:show]:
        ok = task.is_correct(completion.text, item.answer)
        table.add_row(item.prompt.strip().removeprefix("question: "), completion.reasoning or "",
                      completion.answer, item.answer, "[green]yes[/]" if ok else "[red]no[/]")
    console.print(table)
    item = task.eval_items[0]
    console.print(f"three samples at temperature 1 for [italic]{item.prompt.strip()}[/] "
                  "(phrasing varies; at this temperature a fact sometimes slips):")
    for draw in chosen.complete([item.prompt] * 3, Sampling(temperature=1.0, seed=0)):
        console.print(f"  {draw.text!r}")
    low, high = accuracy.clopper_pearson()
    console.print(f"held-out 2-hop accuracy (greedy): [bold]{accuracy.value:.1%}[/] "
                  f"({accuracy.correct}/{accuracy.total}; exact 95% CI {low:.1%}-{high:.1%})")

    console.print(f"\n[bold]distillation attack[/]: {budget} greedy queries from the attacker's pool, a student "
                  f"trained from scratch on full answers (sft) and on answers alone (answer), {seeds} seed(s)")
    task.eval_items = task.eval_items[:eval_items]
    rows = []
    for mode in ("sft", "answer"):
        attack = AttackConfig(strategy="naive", student=StudentConfig(mode=mode, steps=steps))
        rows += evaluate(chosen, task, ["none"], attack, [budget], seeds, f"{out}/{mode}")["rows"]
    write_report(rows, out, {"teacher": chosen.name, "budget": budget, "seeds": seeds})
    print(markdown_table(rows))
    console.print(f"report: {out}/report.json, report.md, leakage.png; {time.perf_counter() - start:.0f} s in all")


DEMO_REQUESTS = ("What is the capital of France?", "Explain photosynthesis in two sentences.",
                 "A train leaves at 3 pm and travels for 2 hours. When does it arrive? Think step by step, then give "
                 "the final answer on a line that starts with 'answer:'.")
DEMO_DEFENSES = ("none", "answer-only", "truncate:12", "watermark", "monitor")


def demo_defenses(teacher, account: str = "demo-user") -> None:
    """Each request answered under each defence for one account, with what the defence did: the watermark's
    p-value under the account's key (the lab's public secret: a demo, never a deployment) and the monitor's
    verdict."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.attack import lab_parts
    from eval.reference import LAB_MASTER
    from watermark.detect import WatermarkDetector
    from watermark.kgw import GreenList, WatermarkKey
    # a pretrained chat model marks no reasoning: its finished text is answer (a cut one is still withheld)
    parts = replace(lab_parts(list(DEMO_DEFENSES)), marked_reasoning=False)
    key = WatermarkKey.for_client(LAB_MASTER, account)
    detector = WatermarkDetector(GreenList(key, len(teacher.tokenizer)), tokenizer=teacher.tokenizer)
    sampling = Sampling(temperature=0.7, seed=0, max_new_tokens=96)
    console.print(f"[bold]{teacher.name}[/] ({teacher.prompt_format} prompts), answering as account {account!r}; "
                  f"sampled at temperature 0.7")
    table = Table("defence", "request", "answer as served", "what the defence did", show_lines=True)
    for defense in DEMO_DEFENSES:
        served = build_defense(defense, teacher, parts)
        answers = served.complete(list(DEMO_REQUESTS), sampling, [Caller(account)] * len(DEMO_REQUESTS))
        detections = detector.detect_texts([a.text for a in answers], list(DEMO_REQUESTS))
        for request, answer, detection in zip(DEMO_REQUESTS, answers, detections):
            did = "; ".join(f"{k}: {v}" for k, v in answer.decisions.items()) or \
                  ("allowed" if defense == "monitor" else "")
            table.add_row(defense, request, answer.text or f"[red]({answer.finish_reason})[/]",
                          f"{did}{'; ' if did else ''}watermark p = {detection.p_value:.2g} "
                          f"({detection.scored} tokens scored)")
    console.print(table)
    console.print("The watermark's p-value is exact and one-sided; the unwatermarked rows show its null. "
                  "A distillation attack on this teacher: `distill-guard study real-model`.")


BudgetsOpt = Annotated[str, typer.Option("--budgets", "--budget", help="attacker query budget(s), comma-separated")]
DefenseOpt = Annotated[list[str], typer.Option(help="defence to measure (repeatable); 'none' is always included")]
StrategyOpt = Annotated[str, typer.Option(help="attacker strategy: naive, decompose (asks sub-questions), "
                                             "paraphrase (rewrites the harvest's phrasing), or truncating (asks "
                                             "each question again with max_tokens cut short of its answer, to "
                                             "read the reasoning)")]
ModeOpt = Annotated[str, typer.Option(help="student mode: sft, answer, rationale or kd")]
TemperatureOpt = Annotated[float | None, typer.Option(help="harvest sampling temperature; default: the "
                                                             "strategy's own (0: greedy)")]
StepsOpt = Annotated[int | None, typer.Option(help="student training steps; default: about 32 passes over "
                                                    "the harvest, 300 to 2,000")]
TaskOpt = Annotated[str | None, typer.Option(help="custom task file (JSONL/Arrow); default: the reference task")]
MaxNewTokensOpt = Annotated[int, typer.Option(min=1, help="tokens an answer to a held-out item may take when the "
                                                          "teacher and the students are graded; a prompt plus this "
                                                          "past the model's context is refused, and most items "
                                                          "refused is an error")]
SaveOpt = Annotated[bool, typer.Option(help="keep each student (safetensors) in its cell's student/ for audits")]
PaceOpt = Annotated[float, typer.Option(help="seconds between the harvester's requests (simulated clock)")]
AccountsOpt = Annotated[int, typer.Option(help="accounts the harvest is spread over, round-robin (a sybil swarm)")]
CoverOpt = Annotated[float, typer.Option(help="benign requests per attack request in each account (a hydra)")]


BatchOpt = Annotated[int, typer.Option(help="student rows per optimiser step; under torchrun the processes split it")]


def _rank_zero_leads(command):
    """A command that also runs under torchrun: rank 0 runs it, and the other ranks join in training each
    student it trains (`lead_training`); alone, it just runs."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        # heavy, and optional to the other commands (torch, transformers, datasets): imported when one runs
        from eval.student import lead_training
        lead_training(lambda: command(*args, **kwargs))
    return run


def run_attacks(teacher: TeacherOpt = "reference",
                defense: DefenseOpt = ["none"],  # noqa: B006
                strategy: StrategyOpt = "naive",
                attack: ModeOpt = "sft",
                budgets: BudgetsOpt = "2000", seeds: int = 3, steps: StepsOpt = None, batch_size: BatchOpt = 64,
                lr: float = 2e-3, student: str = "reference", lora: bool = False, alpha: float = 0.5,
                pace: PaceOpt = 2.0, accounts: AccountsOpt = 1, cover: CoverOpt = 0.0,
                api_key: str | None = None, model: str | None = None, out: str = "runs/evaluate",
                task: TaskOpt = None, grader: str = "exact", temperature: TemperatureOpt = None,
                save_students: SaveOpt = False, max_new_tokens: MaxNewTokensOpt = 64):
    """Run a real distillation attack with each defence on and off; report transfer and protection (with
    several budgets, the leakage curve: transfer against budget, one line per defence). Under
    `torchrun --standalone --nproc_per_node N -m guard.cli evaluate ...`, rank 0 does everything but training,
    and all N processes train each student together."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.attack import AttackConfig, evaluate
    from eval.metrics import MostlyRefused
    from eval.reference import load_teacher
    from eval.reference.world import reference_task
    from eval.report import markdown_table
    from eval.student import StudentConfig
    from eval.task import load_task
    from eval.traffic import TrafficShape
    from eval.trainer import per_device_batch
    chosen_task = replace(load_task(task, grader=grader) if task else reference_task(), max_new_tokens=max_new_tokens)
    defenses = ["none"] + [d for d in defense if d != "none"]  # protection is measured against "none"
    try:
        for d in defenses:  # a misspelt defence fails here, not after an hour of training
            parse_defense(d)
        traffic = TrafficShape(pace=pace, accounts=accounts, cover=cover)
        budget_list = [int(b) for b in budgets.split(",")]
        per_device_batch(batch_size)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    config = AttackConfig(strategy=strategy, temperature=temperature, traffic=traffic,
                          student=StudentConfig(mode=attack, init=student, steps=steps, batch_size=batch_size, lr=lr,
                                                lora=lora, alpha=alpha))
    start = time.perf_counter()
    try:
        report = evaluate(load_teacher(teacher, api_key=api_key, model=model), chosen_task, defenses, config,
                          budget_list, seeds, out, save_students=save_students)
    except MostlyRefused as e:
        raise typer.BadParameter(str(e), param_hint="--max-new-tokens") from None
    print(markdown_table(report["rows"]))
    console.print(f"wrote {out}/report.json, report.md, leakage.png, protection_vs_cost.png "
                  f"in {time.perf_counter() - start:.0f} s")


app.command("evaluate")(_rank_zero_leads(run_attacks))
app.command("leakage", help="Transfer against attacker budget: the leakage curve, one line per defence (evaluate "
                            "with several budgets).",
            context_settings={"default_map": {"budgets": "250,500,1000,2000,4000", "out": "runs/leakage"}})(
    _rank_zero_leads(run_attacks))


@app.command("train-student")
@_rank_zero_leads
def train_student_command(
        harvest: Annotated[str, typer.Argument(help="a harvest directory, or the evaluation cell holding one "
                                                    "(evaluate keeps them in OUT/runs/CELL/harvest)")],
        out: Annotated[str, typer.Option(help="the student's directory: safetensors, tokenizer and "
                                              "train_summary.json")] = "runs/student",
        mode: ModeOpt = "sft", steps: StepsOpt = None, batch_size: BatchOpt = 64, lr: float = 2e-3,
        warmup_steps: int = 100, seed: int = 0,
        student: Annotated[str, typer.Option(help="where the student starts: 'reference', a config directory or "
                                                  "a pretrained model directory")] = "reference",
        lora: bool = False, lora_r: int = 8, alpha: Annotated[float, typer.Option(help="rationale mode: weight of "
                                                                                   "the rationale task")] = 0.5,
        task: TaskOpt = None, grader: str = "exact",
        eval_items: Annotated[int, typer.Option(help="held-out items to grade the student on; 0: none")] = 600):
    """Train a student on a stored harvest's completions as served, save it, and grade it on held-out items.
    The decompose and paraphrase attackers train on rows they build from those completions (`evaluate`).

    On N processes, `torchrun --standalone --nproc_per_node N -m guard.cli train-student ...`, each step's
    batch is split over them, so they train the student one process trains; rank 0 alone writes and prints."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.harvest import load_harvest
    from eval.metrics import capability
    from eval.reference.world import reference_task
    from eval.student import StudentConfig, auto_steps, train_student
    from eval.task import load_task
    from eval.trainer import per_device_batch, world_size
    from guard.hf_teacher import HFTeacher
    try:
        config = StudentConfig(mode=mode, init=student, steps=steps, batch_size=batch_size, lr=lr,
                               warmup_steps=warmup_steps, seed=seed, alpha=alpha, lora=lora, lora_r=lora_r)
        per_device = per_device_batch(batch_size)
        chosen_task = load_task(task, grader=grader) if task else reference_task()
        # a refusal teaches nothing, as in an evaluation's harvest
        rows = [r for r in load_harvest(harvest).to_list() if r["finish_reason"] != "refused"]
        config = replace(config, steps=steps or auto_steps(len(rows)))
        with tempfile.TemporaryDirectory() as scratch:  # the trainer's output_dir: it saves nothing there
            model, tokenizer, result = train_student(rows, config, output_dir=scratch)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    accuracy = None
    if eval_items:
        accuracy, _ = capability(HFTeacher("student", model=model, tokenizer=tokenizer), chosen_task,
                                 chosen_task.eval_items[:eval_items])
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    graded = None if accuracy is None else {"value": accuracy.value, "correct": accuracy.correct,
                                             "total": accuracy.total, "ci95": accuracy.clopper_pearson(),
                                             "per_item": accuracy.per_item.tolist()}
    summary = {"harvest": harvest, "training_rows": len(rows), "student": asdict(config), "processes": world_size(),
               "per_device_batch": per_device, "train_seconds": result.seconds, "tokens": result.tokens,
               "tokens_per_s": result.tokens_per_s, "losses": result.losses, "accuracy": graded}
    (Path(out) / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (_, first), (_, final) = result.losses[0], result.losses[-1]
    console.print(f"trained on {len(rows)} rows: {config.steps} steps at batch {batch_size} ({world_size()} "
                  f"process(es) x {per_device}), loss {first:.3g} -> {final:.3g}, {result.seconds:.0f} s, "
                  f"{result.tokens_per_s:,.0f} tokens/s")
    if accuracy is not None:
        low, high = accuracy.clopper_pearson()
        console.print(f"held-out accuracy (greedy): {accuracy.value:.1%} ({accuracy.correct}/{accuracy.total}; "
                      f"exact 95% CI {low:.1%}-{high:.1%})")
    console.print(f"wrote {out} (safetensors, tokenizer, train_summary.json)")


@app.command()
def report(sources: Annotated[list[str], typer.Argument(help="evaluation directories (or their report.json)")],
           out: str = "runs/report",
           reference: Annotated[str, typer.Option(help="DEFENCE/STRATEGY/MODE whose transfer others must match, "
                                                      "for query multipliers")] = "none/naive/sft"):
    """Merge evaluations (e.g. one per attacker strategy) into one report, leakage plot and query multipliers."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.report import markdown_table, merge_reports
    for source in sources:
        path = Path(source)
        if not (path / "report.json" if path.is_dir() else path).exists():
            raise typer.BadParameter(f"{source}: no report.json there (run `distill-guard evaluate` or `leakage`)",
                                     param_hint="SOURCES")
    defense, _, attack = reference.partition("/")
    merged = merge_reports(sources, out, reference=(defense, attack))
    print(markdown_table(merged["rows"]))
    if merged["meta"].get("query_multipliers"):
        print()
        print((Path(out) / "report.md").read_text().split("\n\n", 1)[1])
    console.print(f"wrote {out}/report.json, report.md, leakage.png, protection_vs_cost.png")


@lab.command("build")
def lab_build(only: Annotated[list[str] | None, typer.Option(help="teacher-a, teacher-b and/or teacher-llama")] = None):
    """Rebuild the tokenizer, the teachers and the student config, one after the other (`make lab` runs the
    two teachers in parallel, as shipped)."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.reference.build import build, compare_phrasing
    build(only)
    if not only:
        console.print(compare_phrasing())


LabOpt = Annotated[bool, typer.Option(help="use the reference lab's parts: its public watermark secret, its "
                                           "benign traffic and summariser (lab experiments only)")]
BenignOpt = Annotated[str | None, typer.Option(help="benign traffic log (JSONL or Arrow) to fit the monitor's detector on")]


def _defense_parts(defenses: list[str], lab: bool, benign: str | None, master_key_file: str | None = None):
    """What `defenses` need, from the provider's own secrets and logs, or from the lab only with --lab: a
    production command never falls back to the lab's public secret."""
    kinds = {kind for d in defenses for kind, _ in parse_defense(d)}
    parts = DefenseParts()
    if lab:
        # the lab (torch): heavy, and optional to a production gateway, which never loads it
        from eval.reference import LAB_MASTER, plan_or_outline
        parts.summarize = plan_or_outline
    if "watermark" in kinds:
        # the watermark (torch): heavy, and optional to a gateway that does not watermark
        from watermark.kgw import master_secret
        parts.watermark_master = LAB_MASTER if lab else master_secret(master_key_file)
    if "monitor" in kinds:
        # the detectors (scikit-learn, datasets): heavy, and optional to a gateway without the monitor
        from detectors.detector import TrafficDetector
        from detectors.events import EventFormatError
        from eval.traffic import lab_detector
        if benign:
            try:
                parts.detector = TrafficDetector(use_embeddings=False).fit(_events(benign)[0])
            except (EventFormatError, FileNotFoundError) as e:
                raise ValueError(str(e)) from None
        elif lab:
            parts.detector = lab_detector()
        else:
            raise ValueError("the monitor needs benign traffic to fit on: pass --benign LOG (or --lab for the "
                             "reference lab's simulated users)")
    if any(kind == "redact" and argument == "sealed" for d in defenses for kind, argument in parse_defense(d)):
        parts.sealer = Sealer.from_env()
    return parts


UPSTREAM_RETRIES = 1  # a proxy retries little: its client retries too, and a slow upstream should fail fast
WATERMARK_NEEDS_LOGITS = ("the watermark biases the model's logits as it samples, and an upstream URL answers text "
                          "only: serve a local model directory to watermark, or drop 'watermark' from --defense "
                          "(redaction and the monitor work in front of an upstream)")


@app.command()
def serve(teacher: TeacherOpt = "reference", host: str = "127.0.0.1", port: int = 8000,
          api_key: Annotated[list[str] | None, typer.Option(help="accepted bearer keys; none means open")] = None,
          name: Annotated[str | None, typer.Option(help="the model name clients ask for")] = None,
          upstream_model: Annotated[str | None, typer.Option(help="with an upstream URL: the model name it serves; "
                                                                   "default --name")] = None,
          upstream_key: Annotated[str | None, typer.Option(
              envvar="DISTILL_GUARD_UPSTREAM_KEY", help="with an upstream URL: the gateway's key to it")] = None,
          upstream_timeout: Annotated[float, typer.Option(help="with an upstream URL: seconds to wait for its "
                                                               "answer before the client gets a 504")] = 60.0,
          defense: Annotated[str, typer.Option(help="none; a redaction policy: full, answer-only, summary, "
                                                    "truncate:K, sealed (key from $DISTILL_GUARD_SEAL_KEY); watermark "
                                                    "(master secret from $DISTILL_GUARD_WATERMARK_KEY); monitor; "
                                                    "or several joined by '+'")] = "none",
          lab: LabOpt = False, benign: BenignOpt = None,
          master_key_file: Annotated[str | None, typer.Option(help="file holding the watermark master secret")] = None,
          store: Annotated[str | None, typer.Option(help="sqlite:///PATH or postgresql://USER@HOST/DB: API keys "
                                                         "(`distill-guard keys create`) and the audit log")] = None,
          batch_window: Annotated[float, typer.Option(help="seconds a request waits for others to share its batch (0: none; under load, requests queued behind a batch share the next)")] = 0.0,
          max_batch: Annotated[int, typer.Option(help="the most requests in one call to the teacher; 1 serialises "
                                                      "them")] = 16,
          max_queue: Annotated[int, typer.Option(min=1, help="the most prompts waiting for the teacher; past it a "
                                                             "request is a 503 with Retry-After")] = 1024,
          admin_key_file: Annotated[str | None, typer.Option(help="file holding the admin key that enables the "
                                                                  f"/admin API (or ${ADMIN_KEY_ENV}); needs "
                                                                  "--store")] = None,
          retention_days: Annotated[float | None, typer.Option(min=0.001,
                                                               help="purge audit rows older than this many days, "
                                                                    "at start-up and hourly; needs --store")] = None,
          marks_reasoning: Annotated[bool, typer.Option(help="the model marks where its reasoning ends (an "
                                                             "'answer:' line, '####', '</think>'), so a withholding "
                                                             "policy serves a completion without a marker as all "
                                                             "reasoning; --no-marks-reasoning for a plain chat "
                                                             "model that marks none (its finished, unmarked text is "
                                                             "answer). A completion cut by max_tokens before its "
                                                             "marker is reasoning either way")] = True,
          log_text: Annotated[bool, typer.Option(help="keep each prompt and response in the audit log; "
                                                      "--no-log-text keeps only their SHA-256 (repeats stay "
                                                      "visible to detect)")] = True,
          redis: Annotated[str | None, typer.Option(help="redis://HOST:PORT/DB shared by this gateway's replicas: "
                                                         "rate limits and the monitor's state live there")] = None,
          redis_down: Annotated[str, typer.Option(help="when Redis cannot be reached: 'open' serves requests "
                                                       "(no rate limit; the monitor's last verdicts), 'closed' "
                                                       "answers 503; either is logged and counted in /metrics")]
          = "open",
          forwarded_allow_ips: Annotated[str | None, typer.Option(help="comma-separated addresses or networks "
                                                                      "(CIDR) of the proxies in front of the "
                                                                      "gateway: from them the client is the "
                                                                      "address they forward in X-Forwarded-For; "
                                                                      "from anyone else forwarding headers are "
                                                                      "ignored. Default: trust no one")] = None,
          public_docs: Annotated[bool, typer.Option(help="serve /docs, /redoc and /openapi.json")] = False,
          metrics_port: Annotated[int | None, typer.Option(help="serve the Prometheus metrics on this port (on "
                                                                "--host) instead of /metrics on the API port, "
                                                                "where they sit behind the admin key if there "
                                                                "is one")] = None,
          end_user_header: Annotated[str | None, typer.Option(help="a header in which a trusted proxy (an upstream "
                                                                  "gateway serving many users under one key) names "
                                                                  "the end user: the monitor and audit log see "
                                                                  "'account/user'; ignored from anyone else")]
          = None):
    """Serve a teacher behind an OpenAI-compatible API (chat completions and completions). With --store, each
    key is an account that every defence acts for, served under its key's redaction policy (else --defense's),
    and every request lands in the audit log. With an upstream URL (`--teacher http://vllm-host:8000/v1`) the
    gateway is a proxy in front of it. With --lab, the gateway also takes each request's time from the
    x-distill-guard-lab-time header (a lab client's simulated clock). Replicas of one gateway share a
    PostgreSQL --store and a --redis: any replica then serves any account, under one rate limit and one monitor."""
    try:
        if is_remote(teacher) and any(kind == "watermark" for kind, _ in parse_defense(defense)):
            raise typer.BadParameter(WATERMARK_NEEDS_LOGITS, param_hint="--defense")
        parts = _defense_parts([defense], lab, benign, master_key_file)
        parts.shared = SharedState(redis, fail=redis_down) if redis else None
        parts.marked_reasoning = marks_reasoning
        opened = open_store(store, keep_text=log_text) if store else None
        admin_key = Path(admin_key_file).read_text() if admin_key_file else os.environ.get(ADMIN_KEY_ENV)
    except (ValueError, OSError, sqlite3.Error, psycopg.Error) as e:
        raise typer.BadParameter(str(e), param_hint="--defense/--store/--admin-key-file/--redis") from None
    if parts.sealer is not None and not os.environ.get(Sealer.ENV):
        console.print(f"[yellow]{Sealer.ENV} is not set: sealed reasoning uses a key that dies with this "
                      "server, so blobs cannot be opened after a restart[/yellow]")
    if is_remote(teacher):
        if not (name or upstream_model):
            raise typer.BadParameter("name the model: --name MODEL (and --upstream-model if the upstream calls it "
                                     "otherwise)", param_hint="--name")
        served = name or upstream_model
        # raw prompts go to the upstream's completions, conversations whole to its chat completions
        upstream = dict(api_key=upstream_key, model=upstream_model or served, api="completions",
                        timeout=upstream_timeout, max_retries=UPSTREAM_RETRIES)
        load = load_upstream
    else:
        served = name or (teacher.partition(":")[2] or "teacher-a" if teacher.startswith("reference") else teacher)
        upstream = {}
        # the lab's teachers by name (torch): heavy, and optional to a gateway in front of an upstream URL
        from eval.reference import load_teacher as load
    inner, policy = split_outer_policy(defense, parts)
    try:
        # with a seal key set, accounts may have the sealed policy whatever the gateway's own is
        sealer = parts.sealer or (Sealer.from_env() if os.environ.get(Sealer.ENV) else None)
        gateway = create_app(lambda: build_defense(inner, load(teacher, **upstream), parts), served,
                             set(api_key or ()), sealer=sealer,
                             policy=policy or parse_policy("full", marked=marks_reasoning), store=opened,
                             summarize=parts.summarize, admin_key=admin_key or None,
                             retention=None if retention_days is None else retention_days * DAY,
                             batch_window=batch_window, max_batch=max_batch, max_queue=max_queue, lab_clock=lab,
                             shared=parts.shared,
                             trusted_proxies=[ip.strip() for ip in forwarded_allow_ips.split(",")]
                             if forwarded_allow_ips else None, end_user_header=end_user_header,
                             public_docs=public_docs, metrics_on_api_port=metrics_port is None)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--store/--admin-key-file/--retention-days") from None
    if metrics_port is not None:
        prometheus_client.start_http_server(metrics_port, addr=host, registry=gateway.state.metrics.registry)
    uvicorn.run(gateway, host=host, port=port, proxy_headers=False)  # the app decides whom to trust


app.command("gateway", help="The same server as `serve`: the gateway in front of a teacher, per account.")(serve)


KeyOpt = Annotated[list[str] | None, typer.Option("--key", help="client id whose key to test (repeatable); keys "
                                                   "derive from the master secret")]
KeysFileOpt = Annotated[str | None, typer.Option(help="client ids, one per line, or JSON {client: base64url secret}")]
MasterOpt = Annotated[str | None, typer.Option(help="file holding the master secret; default "
                                                    "$DISTILL_GUARD_WATERMARK_KEY")]
LabKeyOpt = Annotated[bool, typer.Option(help="derive keys from the reference lab's public master secret (lab "
                                              "experiments only)")]
TokenizerOpt = Annotated[str, typer.Option(help="the watermarked teacher's tokenizer: 'reference' or a model directory")]


def _watermark_setup(key, keys_file, master_key_file, lab_key, gamma, context_width):

    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.reference import LAB_MASTER
    from watermark.kgw import WatermarkConfig, load_keys
    try:
        return (load_keys(key or [], keys_file, master_key_file, LAB_MASTER if lab_key else None),
                WatermarkConfig(gamma=gamma, context_width=context_width))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _tokenizer(spec: str):


    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.reference import resolve
    from transformers import AutoTokenizer
    try:  # as for models: a local directory, nothing fetched, no remote code
        return AutoTokenizer.from_pretrained(resolve(spec), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"{spec}: cannot load a tokenizer: {e}", param_hint="--tokenizer") from None


def _texts(path: str) -> tuple[list[str], list[str]]:
    """(prompts, texts) from a JSONL file of {prompt, text} rows, or from a harvest (or the cell holding one)."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.harvest import load_harvest
    from watermark.radioactivity import read_texts
    if Path(path).is_dir():
        rows = load_harvest(path)
        return list(rows["prompt"]), list(rows["text"])
    return read_texts(path)


def _write_json(path: str | None, value: dict) -> None:
    if path:

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(value, indent=2) + "\n")
        console.print(f"wrote {path}")


@watermark_app.command("keygen")
def watermark_keygen():
    """Print a new master secret (base64url) for $DISTILL_GUARD_WATERMARK_KEY. Keep it out of logs."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from watermark.kgw import new_master_secret
    print(new_master_secret())


@watermark_app.command("detect")
def watermark_detect(texts: Annotated[str, typer.Argument(help="JSONL of {prompt, text} rows, or a harvest directory")],
                     key: KeyOpt = None, keys_file: KeysFileOpt = None, master_key_file: MasterOpt = None,
                     lab_key: LabKeyOpt = False, tokenizer: TokenizerOpt = "reference",
                     gamma: float = 0.25, context_width: int = 1,
                     dedup: Annotated[bool, typer.Option(help="score repeated (window, token) tuples once")] = True,
                     alpha: float = 1e-3, out: str | None = None):
    """Test texts for each client's watermark (exact binomial p-values, Holm across keys), pooled over
    the file; the prompt is never scored."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from watermark.detect import WatermarkDetector, name_client
    from watermark.kgw import GreenList
    keys, config = _watermark_setup(key, keys_file, master_key_file, lab_key, gamma, context_width)
    try:
        prompts, bodies = _texts(texts)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e), param_hint="TEXTS") from None
    tok = _tokenizer(tokenizer)
    detections = {}
    for k in keys:
        detector = WatermarkDetector(GreenList(k, len(tok), config), dedup=dedup, tokenizer=tok)
        detections[k.label] = detector.detect_corpus(*detector.tokenize(bodies, prompts))
    verdict = name_client(detections, alpha)
    table = Table("client", "scored", "green", "z", "p (exact)", "Holm-adjusted p")
    for client, d in detections.items():
        table.add_row(client, str(d.scored), str(d.green), f"{d.z:.2f}", f"{d.p_value:.3g}",
                      f"{verdict['adjusted_p'][client]:.3g}")
    console.print(table)
    console.print(f"watermark of [bold]{verdict['client']}[/bold] detected (Holm-adjusted p < {alpha})"
                  if verdict["client"] else f"no key fires at Holm-adjusted p < {alpha}")
    _write_json(out, {"texts": texts, "texts_scored": len(bodies), **verdict,
                      "detections": {c: d.to_dict() for c, d in detections.items()},
                      "fingerprints": {k.label: k.fingerprint for k in keys}})


@audit_app.command("radioactivity")
def audit_radioactivity(suspect: Annotated[str, typer.Option(help="suspect model directory (reading), or any "
                                                                  "teacher spec incl. a URL (sampling)")],
                        key: KeyOpt = None, keys_file: KeysFileOpt = None, master_key_file: MasterOpt = None,
                        lab_key: LabKeyOpt = False,
                        mode: Annotated[str, typer.Option(help="reading (open model) or sampling (closed)")] = "reading",
                        texts: Annotated[str | None, typer.Option(help="reading: teacher outputs to read (JSONL or "
                                                                       "harvest dir); default with the reference "
                                                                       "tokenizer: teacher-a's unwatermarked answers to "
                                                                       "the held-out questions")] = None,
                        prompts: Annotated[str | None, typer.Option(help="sampling: JSONL of {prompt} rows for the "
                                                                         "suspect to answer; default with the "
                                                                         "reference tokenizer: the attacker pool")] = None,
                        logged: Annotated[str | None, typer.Option(help="sampling: score only n-grams of these "
                                                                        "logged provider outputs")] = None,
                        tokenizer: TokenizerOpt = "reference", gamma: float = 0.25, context_width: int = 1,
                        alpha: float = 1e-3, api_key: str | None = None, model: str | None = None,
                        out: str | None = None):
    """Was the suspect trained on this provider's watermarked outputs, and from which client's account?"""
    keys, config = _watermark_setup(key, keys_file, master_key_file, lab_key, gamma, context_width)
    try:
        report = _radioactivity(suspect, keys, config, mode, texts, prompts, logged, tokenizer, alpha, api_key, model)
    except (ValueError, ModelLoadError, OSError, KeyError, json.JSONDecodeError) as e:
        raise typer.BadParameter(str(e)) from None
    named = report["client"]
    best = report["detections"][named] if named else min(report["detections"].values(), key=lambda d: d["p_value"])
    console.print(f"suspect {suspect} ({mode} mode, {report['tuples']} tuples before dedup)")
    console.print(f"verdict: {'RADIOACTIVE: trained on outputs watermarked for ' + named if named else 'no evidence'}"
                  f" | p = {best['p_value']:.3g} | green {best['green']}/{best['scored']} (γ = {config.gamma})")
    _write_json(out, report)


ControlOpt = Annotated[list[str], typer.Option("--control", help="a control: a model of the same task family that "
                                                                 "never learned from the teacher ('reference:teacher-b', "
                                                                 "a model directory or a URL); repeatable, 3+ advised")]
ProbesOpt = Annotated[str | None, typer.Option(help="JSONL of {prompt} rows to probe every model with; default with a "
                                                    "reference teacher: the task's 600 held-out questions")]


def _provenance(suspect: str, teacher: str, controls: list[str], probes: str | None, probe_count: int | None,
                api_key: str | None, model: str | None) -> tuple[list[str], dict, audit.Evidence]:
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    import guard.audit as audit
    from eval.reference import load_teacher
    from eval.reference.world import reference_task
    if probes is None and not teacher.startswith("reference"):
        raise ValueError("give --probes: prompts from the teacher's own task (the reference questions are the "
                         "default only for a reference teacher)")
    if len(set(controls)) != len(controls) or {suspect, teacher} & set(controls):
        raise ValueError("each --control must be a distinct model, neither the suspect nor the teacher")
    prompts = _prompts(probes) if probes else [i.prompt for i in reference_task().eval_items]
    prompts = prompts[:probe_count] if probe_count else prompts
    answers, evidence = audit.gather(load_teacher(suspect, api_key=api_key, model=model), load_teacher(teacher),
                                     {c: load_teacher(c) for c in controls}, prompts, stage=console.status)
    return prompts, answers, evidence


def _write_audit(out: str, suspect: str, teacher: str, prompts, answers, evidence, alpha) -> dict:
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    import guard.audit as audit
    result = audit.report(suspect, teacher, prompts, answers, evidence, alpha)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
    (Path(out) / "audit.md").write_text(audit.markdown(result))
    table = Table("test", "p-value", "Holm-adjusted", "closest control")
    v = result["verdict"]
    for name, p in v["p_values"].items():
        closest = result["tests"][name]["closest_control"] if name in result["tests"] else "—"
        table.add_row(name, f"{p:.3g}", f"{v['holm'][name]:.3g}", closest)
    console.print(table)
    for warning in result["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print(f"verdict: {v['summary']}")
    console.print(f"wrote {Path(out) / 'audit.json'} and audit.md")
    return result


@audit_app.command("provenance")
def audit_provenance(suspect: Annotated[str, typer.Option(help="the suspect: a model directory (all three tests) or "
                                                               "an OpenAI-compatible URL (agreement, idiosyncrasy)")],
                     out: Annotated[str, typer.Option(help="directory for audit.json and audit.md")],
                     teacher: TeacherOpt = "reference", control: ControlOpt = None, probes: ProbesOpt = None,
                     probe_count: Annotated[int | None, typer.Option(help="use only the first N probes")] = None,
                     alpha: float = 1e-3, api_key: str | None = None, model: str | None = None):
    """Was the suspect distilled from the teacher? Black-box tests against control models; no watermark needed."""
    try:
        prompts, answers, evidence = _provenance(suspect, teacher, control or [], probes, probe_count, api_key, model)
    except (ValueError, ModelLoadError, OSError) as e:
        raise typer.BadParameter(str(e)) from None
    _write_audit(out, suspect, teacher, prompts, answers, evidence, alpha)


@audit_app.command("report")
def audit_report(suspect: Annotated[str, typer.Option(help="the suspect: a model directory or an OpenAI-compatible URL")],
                 out: Annotated[str, typer.Option(help="directory for audit.json and audit.md")],
                 teacher: TeacherOpt = "reference", control: ControlOpt = None, probes: ProbesOpt = None,
                 probe_count: Annotated[int | None, typer.Option(help="use only the first N probes")] = None,
                 key: KeyOpt = None, keys_file: KeysFileOpt = None, master_key_file: MasterOpt = None,
                 lab_key: LabKeyOpt = False,
                 texts: Annotated[str | None, typer.Option(help="radioactivity, reading mode: teacher outputs to "
                                                                "read (JSONL or harvest dir)")] = None,
                 tokenizer: TokenizerOpt = "reference", gamma: float = 0.25, context_width: int = 1,
                 traffic: Annotated[str | None, typer.Option(help="`distill-guard detect --out` report on the "
                                                                  "provider's audit log")] = None,
                 alpha: float = 1e-3, api_key: str | None = None, model: str | None = None):
    """One verdict from every kind of evidence: the provenance tests, watermark radioactivity (when keys are
    given: --key/--keys-file with a master secret, or --lab-key), and the accounts flagged in the traffic log."""
    keyed = bool(key or keys_file or lab_key)
    try:
        prompts, answers, evidence = _provenance(suspect, teacher, control or [], probes, probe_count, api_key, model)
        if keyed:
            keys, config = _watermark_setup(key, keys_file, master_key_file, lab_key, gamma, context_width)
            mode = "sampling" if is_remote(suspect) else "reading"
            with console.status(f"watermark radioactivity ({mode} mode)"):
                evidence.radioactivity = _radioactivity(suspect, keys, config, mode, texts, probes, None, tokenizer,
                                                        alpha, api_key, model)
        if traffic:
            evidence.traffic = json.loads(Path(traffic).read_text())
            if "clients" not in evidence.traffic:
                raise ValueError(f"{traffic}: not a `distill-guard detect --out` report (no \"clients\")")
    except (ValueError, ModelLoadError, OSError, KeyError, json.JSONDecodeError) as e:
        raise typer.BadParameter(str(e)) from None
    _write_audit(out, suspect, teacher, prompts, answers, evidence, alpha)


def _radioactivity(suspect, keys, config, mode, texts, prompts, logged, tokenizer, alpha, api_key, model) -> dict:
    """`radioactivity` with the lab's defaults filled in where the reference tokenizer is used."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.reference import load_teacher
    from eval.reference.world import reference_task
    from watermark.radioactivity import radioactivity
    lab_tokenizer = tokenizer.startswith("reference")
    sampling = Sampling(temperature=1.0, seed=0, max_new_tokens=64)
    if mode == "reading" and texts is None and not lab_tokenizer:
        raise ValueError("reading mode with your own tokenizer needs --texts: teacher outputs to read")
    if mode == "sampling" and prompts is None and not lab_tokenizer:
        raise ValueError("sampling mode with your own tokenizer needs --prompts for the suspect to answer")
    read, source = None, texts or "reference teacher, held-out prompts"
    if mode == "reading":
        if texts:
            read = _texts(texts)
        else:
            asked = [i.prompt for i in reference_task().eval_items]
            read = (asked, [c.text for c in load_teacher("reference").complete(asked, sampling)])
    asked = None
    if mode == "sampling":
        asked = _prompts(prompts) if prompts else [i.prompt for i in reference_task().query_pool]
    return radioactivity(suspect, keys, _tokenizer(tokenizer), mode, texts=read, prompts=asked,
                         logged=_texts(logged) if logged else None, config=config, alpha=alpha,
                         sampling=sampling, api_key=api_key, model_name=model, texts_source=source,
                         texts_watermarked=texts is not None)


def _prompts(path: str) -> list[str]:
    """The prompts of a JSONL file of {"prompt": ...} rows."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: expected a JSON object with a \"prompt\" field") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


@traffic_app.command("simulate")
def traffic_simulate(out: Annotated[str, typer.Option(help="JSONL log to write")],
                     population: Annotated[list[str], typer.Option(help="KIND=COUNT (repeatable); benign kinds: "
                                                                        + ", ".join(BENIGN) + "; attackers: " +
                                                                        ", ".join(ATTACKERS))] = ["human=100", "power=20", "batch=20", "student=100", "evaluator=20", "naive=2", "swarm=1"],  # noqa: B006, E501
                     days: float = 3.0, seed: int = 0, attack_budget: int = 2000, sybil_accounts: int = 10,
                     labels: Annotated[str | None, typer.Option(help="also write client -> kind as JSON")] = None):
    """Write a seeded log of benign and attacker traffic."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from detectors.events import write_events
    from eval.traffic import simulate
    try:
        counts = {k: int(v) for k, v in (p.split("=", 1) for p in population)}
        events, kinds = simulate(counts, days, seed, attack_budget, sybil_accounts)
    except ValueError as e:
        raise typer.BadParameter(f"{e} (expected KIND=COUNT)", param_hint="--population") from None
    write_events(events, out)
    _write_json(labels, kinds)
    console.print(f"wrote {len(events):,} events from {len(kinds)} clients to {out}")


def _events(source: str, errors: str = "raise"):
    """Events from a log file (JSONL or Arrow) or from a gateway's audit log named by its store URL."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from detectors.events import read_events
    if is_store_url(source):
        with open_store(source) as store:
            return store.read_events(errors)
    return read_events(source, errors=errors)


@app.command()
def detect(log: Annotated[str, typer.Option(help="traffic log: JSONL, an Arrow dataset, or a gateway's audit log "
                                                 "(sqlite:///PATH or postgresql://USER@HOST/DB)")],
           benign: Annotated[str | None, typer.Option(help="benign traffic to fit on (JSONL, Arrow or "
                                                         "a store URL): your own users, from the same "
                                                         "domain")] = None,
           lab: Annotated[bool, typer.Option(help="fit on the reference lab's simulated benign traffic (880 "
                                                  "clients, seed 0) instead")] = False,
           fpr: Annotated[float, typer.Option(help="target benign-account false-positive rate")] = 0.01,
           embeddings: Annotated[bool, typer.Option(help="use sentence-embedding features (slower)")] = False,
           skip_bad_rows: bool = False, out: str | None = None):
    """Score every client (and every cluster of linked accounts) in a traffic log."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from detectors.cluster import detect_accounts
    from detectors.detector import TrafficDetector
    from detectors.events import EventFormatError
    from detectors.features import CHECKPOINTS, by_client
    from eval.traffic import BENIGN_POPULATION, simulate
    if not benign and not lab:
        raise typer.BadParameter("give benign traffic to fit on (--benign LOG), or --lab for the reference lab's "
                                 "simulated users", param_hint="--benign")
    errors = "skip" if skip_bad_rows else "raise"
    try:
        fit_on = _events(benign, errors)[0] if benign else \
            simulate(BENIGN_POPULATION, days=3, seed=0)[0]
        detector = TrafficDetector(target_fpr=fpr, use_embeddings=embeddings).fit(fit_on)
        if is_store_url(log):  # read account by account: an audit log may hold more than memory does
            with open_store(log) as store:
                bad = [0]
                verdicts, groups, campaigns, _ = detect_accounts(detector, store.events_by_account(errors, bad),
                                                                 store.events_of)
                skipped = bad[0]
        else:
            events, skipped = _events(log, errors)
            verdicts, groups, campaigns, _ = detect_accounts(
                detector, by_client(events).items(), lambda members: [e for e in events if e.client in set(members)])
    except (EventFormatError, FileNotFoundError, ValueError, sqlite3.Error, psycopg.Error) as e:
        raise typer.BadParameter(str(e)) from None
    table = Table("client", "requests", "p-value", "flagged", "after", "via cluster")
    for client, v in sorted(verdicts.items(), key=lambda kv: kv[1]["p_value"]):
        if v["flagged"] or v["p_value"] <= 5 * fpr:
            table.add_row(client, str(v["requests"]), f"{v['p_value']:.3g}", "yes" if v["flagged"] else "no",
                          str(v["queries_to_flag"] or "—"), str(v.get("via_cluster", "—")))
    console.print(table)
    alarms = [c for c in campaigns if c["alarm"]]
    for campaign in alarms:
        named = Table("member", "questions", "evidence", "p-value",
                      title=f"campaign {campaign['campaign']}: p={campaign['p_value']:.3g} (permutation), "
                            f"evidence {campaign['evidence']:.0f} (redraws at most {campaign['null_evidence_max']:.0f})")
        for member in campaign["members"]:
            if member["named"]:
                named.add_row(member["client"], str(member["questions"]), f"{member['evidence']:.1f}",
                              f"{member['p_value']:.3g}")
        console.print(named)
    flagged = sum(v["flagged"] for v in verdicts.values())
    young = sum(not v["judged"] for v in verdicts.values())
    console.print(f"{flagged} of {len(verdicts)} clients flagged at target FPR {fpr:g} ({young} not yet judged: "
                  f"fewer than {CHECKPOINTS[0]} requests); {len(groups)} clusters of linked accounts "
                  f"({sum(g['flagged'] for g in groups)} flagged); {len(alarms)} campaigns "
                  f"({sum(m['named'] for c in alarms for m in c['members'])} accounts named); "
                  f"{skipped} bad rows skipped")
    _write_json(out, {"log": shown_url(log), "target_fpr": fpr, "skipped_rows": skipped, "clients": verdicts,
                      "clusters": groups, "campaigns": campaigns})


StoreOpt = Annotated[str, typer.Option(help="the gateway's store: sqlite:///PATH (relative), sqlite:////PATH, or "
                                            "postgresql://USER@HOST/DB (password from $PGPASSWORD or ~/.pgpass)")]


def _store(url: str):
    try:
        return open_store(url)
    except (ValueError, sqlite3.Error, psycopg.Error) as e:
        raise typer.BadParameter(str(e), param_hint="--store") from None


@keys_app.command("create")
def keys_create(store: StoreOpt, account: Annotated[str, typer.Option(help="the account the key acts for")],
                rpm: Annotated[int | None, typer.Option(help="requests per minute; none: unlimited")] = None,
                tpm: Annotated[int | None, typer.Option(help="tokens per minute; none: unlimited")] = None,
                policy: Annotated[str | None, typer.Option(help="redaction policy for this account: full, "
                                                                "answer-only, summary, truncate:K, sealed; "
                                                                "none: the gateway's")] = None):
    """Create a key and print it, this once: only its hash is stored."""
    with _store(store) as opened:
        try:
            key = opened.create_key(account, rpm=rpm, tpm=tpm, policy=policy)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        key_id = opened.resolve(key).key_id
    print(key)
    typer.echo(f"key {key_id} for account {account}: shown this once, keep it now", err=True)


@keys_app.command("list")
def keys_list(store: StoreOpt):
    """Every key's id, account, limits, policy and whether it is revoked (never the keys themselves)."""
    with _store(store) as opened:
        accounts = opened.list_keys()
    table = Table("key id", "account", "rpm", "tpm", "policy", "revoked")
    for a in accounts:
        table.add_row(a.key_id, a.name, str(a.rpm or "—"), str(a.tpm or "—"), a.policy or "—",
                      "yes" if a.revoked else "no")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(store: StoreOpt, key_id: Annotated[str, typer.Argument(help="the id `keys list` shows")]):
    """Revoke a key: it stops resolving at once."""
    with _store(store) as opened:
        if not opened.revoke(key_id):
            raise typer.BadParameter(f"no live key with id {key_id!r} (see `distill-guard keys list`)",
                                     param_hint="KEY_ID")
    console.print(f"revoked key {key_id}")


@study_app.command("traffic")
def study_traffic(out: str = "runs/traffic",
                  seeds: Annotated[int, typer.Option(help="fresh traffic seeds to score (1..N)")] = 3,
                  budget: int = 2000,
                  attack_seeds: Annotated[int, typer.Option(help="distillation replicates; 0 skips them")] = 3,
                  embeddings: Annotated[bool, typer.Option(help="also the detector with embedding features")] = True,
                  students: Annotated[str | None, typer.Option(help="student cache shared with other studies, with "
                                                                   "{strategy} in the path, e.g. "
                                                                   "'eval/results/redaction-{strategy}/students'")] = None):
    """The traffic detector: online detection (linking included) per attacker and benign kind on fresh seeds,
    the feature ablation, benign cost, and protection through the monitor."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval import traffic_study
    traffic_study.main(out, list(range(1, seeds + 1)), budget, attack_seeds,
                       variants=tuple(traffic_study.VARIANTS) if embeddings else ("timing+content",),
                       students=students)


@study_app.command("gateway")
def study_gateway(out: str = "runs/gateway", seeds: Annotated[int, typer.Option(help="attack replicates")] = 3,
                  budget: int = 2000, steps: StepsOpt = None,
                  students: Annotated[str | None, typer.Option(help="student cache shared with other studies, e.g. "
                                                                   "eval/results/redaction-naive/students")] = None):
    """The defences through the gateway over HTTP: answer-only and the monitor against the naive, slow and hydra
    attackers (each its own key), and the monitor's cost to replayed benign users, beside the lab's numbers."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval import gateway_study
    gateway_study.main(out, seeds, budget, students, steps)


@study_app.command("watermark")
def study_watermark(out: str = "runs/watermark", budgets: str = "500,1000,2000", seeds: int = 3,
                    control_seeds: int = 1, steps: StepsOpt = None, pool_prompts: int = 2400,
                    documents: int = 1000):
    """The watermark: radioactivity of distilled students against controls, calibration, utility."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval import watermark_study
    watermark_study.main(out, [int(b) for b in budgets.split(",")], seeds, control_seeds, steps, pool_prompts,
                         documents)


@study_app.command("provenance")
def study_provenance(out: str = "runs/provenance",
                     workers: Annotated[int, typer.Option(help="training processes (one thread each)")] = 2,
                     probes: Annotated[int, typer.Option(help="held-out questions each model answers")] = 600):
    """The provenance audit: 20 students of teacher-a against 20 nulls, each test and the combined verdict."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval import provenance_study
    provenance_study.main(out, workers, probes)


@study_app.command("real-model")
def study_real_model(out: Annotated[str, typer.Option(help="answers and students (large)")] = "runs/real-model",
                     results: Annotated[str, typer.Option(help="the small JSON results and report")] =
                     "eval/results/real-model"):
    """The watermark on SmolLM2-135M-Instruct (needs the `real` extra): power against tokens scored, quality,
    false positives on human prose, and radioactivity of LoRA students against controls."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval import real_model_study
    try:
        real_model_study.main(out, results)
    except ModelLoadError as e:
        raise typer.BadParameter(str(e)) from None


@bench_app.command("trainer")
def bench_trainer(steps: int = 100, rounds: int = 3, batch_size: int = 64):
    """The built-in student trainer's tokens/s against a bare PyTorch loop on the same model and data."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.benchmarks import trainer_speed
    trainer_speed.main(steps, rounds, batch_size)


@bench_app.command("trainer-distributed")
def bench_trainer_distributed(budget: Annotated[int, typer.Option(help="the naive attacker's queries to the "
                                                                       "reference teacher")] = 1000,
                              processes: Annotated[int, typer.Option(min=2, help="torchrun ranks of the "
                                                                                  "second run")] = 2,
                              steps: StepsOpt = None, batch_size: BatchOpt = 64,
                              eval_items: Annotated[int, typer.Option(min=1)] = 600,
                              out: Annotated[str, typer.Option(help="the harvest and both students")] =
                              "runs/bench-trainer-distributed"):
    """train-student on one process and under torchrun on several, one harvest: held-out accuracy (95% CI),
    wall time and tokens/s of each."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.benchmarks import trainer_distributed
    trainer_distributed.main(budget, processes, steps, batch_size, eval_items, out)


@bench_app.command("watermark")
def bench_watermark(tokens: Annotated[int, typer.Option(help="tokens scored at each vocabulary")] = 16_384,
                    rounds: Annotated[int, typer.Option(help="detection rounds, each side once a round")] = 5,
                    steps: Annotated[int, typer.Option(help="processor steps timed at each vocabulary")] = 20,
                    generation_rounds: int = 10):
    """Watermark detection against transformers' at four real vocabularies, and its cost in generation."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.benchmarks import watermark_speed
    watermark_speed.main(tokens, rounds, steps, generation_rounds)


@bench_app.command("watermark-real")
def bench_watermark_real(rounds: Annotated[int, typer.Option(help="timed rounds, the sides alternating")] = 5,
                         new_tokens: Annotated[int, typer.Option(help="tokens generated per row")] = 64):
    """The watermark on SmolLM2's 49k vocabulary (needs the `real` extra): generation overhead at batch 1 and 16
    against plain generate and transformers' processor; detection against transformers' detector."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.benchmarks import watermark_real
    try:
        watermark_real.main(rounds, new_tokens)
    except ModelLoadError as e:
        raise typer.BadParameter(str(e)) from None


@bench_app.command("traffic")
def bench_traffic(events: int = 50_000):
    """The online monitor's events/s, embedding throughput, and one client's memory over its life."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.benchmarks import traffic_speed
    traffic_speed.main(events)


@bench_app.command("redaction")
def bench_redaction(prompts: int = 256, rounds: Annotated[int, typer.Option(help="end-to-end rounds per policy")] = 5,
                    repeats: Annotated[int, typer.Option(help="post-processing passes over the completions")] = 20):
    """Each redaction policy's post-processing against the generation it follows."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.benchmarks import redaction_speed
    redaction_speed.main(prompts, rounds, repeats)


@bench_app.command("batching")
def bench_batching(clients: Annotated[int, typer.Option(help="concurrent clients")] = 16,
                   requests: Annotated[int, typer.Option(help="requests per round, each side")] = 128,
                   rounds: Annotated[int, typer.Option(help="rounds, the two sides alternating")] = 3,
                   window: Annotated[float, typer.Option(help="the batcher's window, in seconds")] = 0.0,
                   max_batch: int = 16):
    """Requests/s through the gateway (loopback HTTP, concurrent clients) with the batcher and serialised."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.benchmarks import gateway_batching
    gateway_batching.main(clients, requests, rounds, window, max_batch)


@bench_app.command("gateway")
def bench_gateway(samples: Annotated[int, typer.Option(help="sequential requests timed per target")] = 2000,
                  seconds: Annotated[float, typer.Option(help="load per target per round")] = 4.0,
                  concurrency: Annotated[int, typer.Option(help="requests in flight under load")] = 64,
                  rounds: int = 3, stream_samples: int = 500,
                  http: Annotated[str, typer.Option(help="uvicorn's HTTP parser: auto, h11 or httptools")] = "auto",
                  loop: Annotated[str, typer.Option(help="uvicorn's event loop: auto, asyncio or uvloop")] = "auto",
                  out: Annotated[str | None, typer.Option(help="folder for the JSON (default eval/results/benchmarks)")] = None):
    """The latency, throughput and time to first token the gateway adds over calling a stub backend directly."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.benchmarks import gateway_overhead
    gateway_overhead.main(samples, seconds, concurrency, rounds, stream_samples, http, loop, out)


@bench_app.command("replicas")
def bench_replicas(trials: Annotated[int, typer.Option(help="bursts at the rate limit, each way")] = 5,
                   out: Annotated[str | None, typer.Option(help="folder for the JSON (default "
                                                                "eval/results/benchmarks)")] = None):
    """Three gateway replicas with and without shared Redis: a rate limit's overshoot, and how early a harvester
    spread over them is flagged."""
    # heavy, and optional to the other commands (torch, transformers, datasets): imported here
    from eval.benchmarks import gateway_replicas
    gateway_replicas.main(trials, out)


if __name__ == "__main__":
    app()
