"""A tiny real evaluation: harvest from teacher-a, train real students for a few steps, report."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from eval.attack import AttackConfig, evaluate
from eval.metrics import MostlyRefused, capability
from eval.reference import MODELS_DIR
from eval.reference.world import reference_task
from eval.student import StudentConfig, training_set
from eval.task import Task
from guard.cli import app
from guard.hf_teacher import HFTeacher
from guard.teacher import Sampling


@pytest.fixture(scope="module")
def small_task():
    task = reference_task()
    return Task("reference", task.eval_items[:60], task.query_pool, grader="exact")


@pytest.mark.slow
def test_tiny_end_to_end_evaluation_trains_real_students(teacher_a, small_task, tmp_path):
    attack = AttackConfig(strategy="naive", sampling=Sampling(temperature=1.0, max_new_tokens=48),
                          student=StudentConfig(mode="sft", steps=40, batch_size=32, lr=3e-3, warmup_steps=5))
    report = evaluate(teacher_a, small_task, ["none"], attack, budgets=[96], seeds=2, out_dir=tmp_path,
                      progress=False)
    row = report["rows"][0]
    assert row["budget"] == 96 and row["seeds"] == 2 and row["queries"] == 96
    assert row["teacher_acc"] > 0.8
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"][0]["transfer"]["mean"] == pytest.approx(row["transfer"]["mean"])
    for seed in range(2):
        cell = json.loads((tmp_path / "runs" / f"none-naive-sft-b96-s{seed}" / "cell.json").read_text())
        assert cell["final_loss"] < 0.6 * cell["first_loss"], cell  # the student really learned
    assert (tmp_path / "leakage.png").exists() and (tmp_path / "report.md").exists()


def test_students_with_identical_training_sets_are_trained_once(teacher_a, small_task, tmp_path):
    """full shows what none shows, sealed what answer-only shows: those cells reuse one student each."""
    attack = AttackConfig(student=StudentConfig(mode="sft", steps=10, batch_size=32, warmup_steps=2))
    report = evaluate(teacher_a, small_task, ["none", "full", "answer-only", "sealed"], attack, budgets=[48], seeds=1,
                      out_dir=tmp_path, progress=False)
    cells = {d: json.loads((tmp_path / "runs" / f"{d}-naive-sft-b48-s0" / "cell.json").read_text())
             for d in ["none", "full", "answer-only", "sealed"]}
    assert "reused" not in cells["none"] and "reused" not in cells["answer-only"]
    assert cells["full"]["training_key"] == cells["none"]["training_key"] and cells["full"]["reused"]
    assert cells["sealed"]["training_key"] == cells["answer-only"]["training_key"] and cells["sealed"]["reused"]
    assert cells["answer-only"]["training_key"] != cells["none"]["training_key"]
    assert cells["sealed"]["after"] == cells["answer-only"]["after"]
    assert len(list((tmp_path / "students").glob("student-*.json"))) == 2
    assert len(list((tmp_path / "students").glob("before-*.json"))) == 1  # one start, graded once
    reasoning_shown = {r["defense"]: r["utility_cost"]["reasoning_shown"] for r in report["rows"]}
    assert reasoning_shown == {"none": 1.0, "full": 1.0, "answer-only": 0.0, "sealed": 0.0}


def test_a_resumed_evaluation_retrains_a_saved_student_whose_checkpoint_is_gone(teacher_a, small_task, tmp_path):
    """Cells and score caches are committed without checkpoints; an audit needs the checkpoint back."""
    import shutil

    attack = AttackConfig(student=StudentConfig(mode="sft", steps=4, batch_size=32, warmup_steps=1))
    run = lambda: evaluate(teacher_a, small_task, ["none"], attack, budgets=[24], seeds=1, out_dir=tmp_path,
                           progress=False, save_students=True)
    run()
    cell_path = tmp_path / "runs" / "none-naive-sft-b24-s0" / "cell.json"
    first = json.loads(cell_path.read_text())
    shutil.rmtree(first["student_path"])
    run()
    again = json.loads(cell_path.read_text())
    assert (tmp_path / "runs" / "none-naive-sft-b24-s0" / "student" / "config.json").exists()
    assert "reused" not in again and again["training_key"] == first["training_key"]


def test_an_attacker_refused_every_query_keeps_the_student_it_started_from(small_task, tmp_path):
    from eval.attack import student_before, train_and_score
    from eval.student import train_student

    config = StudentConfig(mode="sft", steps=4)
    with pytest.raises(ValueError, match="no training rows"):
        train_student([], config)
    trained = train_and_score([], small_task, config, tmp_path, progress=False)
    assert trained["training_rows"] == 0 and trained["final_loss"] is None
    assert (trained["after"] == student_before(config, small_task)).all()


def test_modes_build_the_training_rows_they_promise(teacher_a):
    rows = [{"prompt": "question: where does Kalon live?\n",
             "text": "okay. Kalon lives in Tilden. done.\nanswer: Tilden", "token_ids": [], "top_ids": [],
             "top_tokens": [], "top_logprobs": []}]
    tok = teacher_a.tokenizer

    def completion_text(ds, i=0):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        return tok.decode([t for t, lab in zip(ids, labels) if lab != -100], skip_special_tokens=True)

    assert completion_text(training_set(rows, "sft", tok)) == rows[0]["text"]
    assert completion_text(training_set(rows, "answer", tok)) == "answer: Tilden"
    rationale = training_set(rows, "rationale", tok, alpha=0.3)
    assert sorted(np.round(rationale["weight"], 6)) == [0.3, 0.7]
    assert {completion_text(rationale, i) for i in range(2)} == {"okay. Kalon lives in Tilden. done.", "answer: Tilden"}
    with pytest.raises(ValueError, match="needs top-k logprobs"):
        training_set(rows, "kd", tok)


def test_kd_student_trains_on_teacher_logprobs(teacher_a, small_task, tmp_path):
    attack = AttackConfig(strategy="naive", sampling=Sampling(temperature=1.0, max_new_tokens=48, logprobs=5),
                          student=StudentConfig(mode="kd", steps=30, batch_size=32, lr=3e-3, warmup_steps=5))
    evaluate(teacher_a, small_task, ["none"], attack, budgets=[64], seeds=1, out_dir=tmp_path, progress=False)
    cell = json.loads((tmp_path / "runs" / "none-naive-kd-b64-s0" / "cell.json").read_text())
    assert cell["final_loss"] < 0.6 * cell["first_loss"]


def test_lora_student_from_a_pretrained_path(tmp_path):
    from eval.reference import MODELS_DIR
    from eval.student import train_student

    rows = [{"prompt": i.prompt, "text": f"answer: {i.answer}"} for i in reference_task().query_pool[:64]]
    config = StudentConfig(mode="sft", init=str(MODELS_DIR / "teacher-b"), lora=True, lora_r=4, steps=12,
                           batch_size=16, lr=1e-2, warmup_steps=0)
    model, _, result = train_student(rows, config, output_dir=str(tmp_path), progress=False)
    assert not hasattr(model, "peft_config")  # adapters merged: a plain transformers model comes back
    assert result.losses[-1][1] < result.losses[0][1]
    assert sum(p.numel() for p in model.parameters()) == 940800  # the base model's shape after merging


def test_a_shared_student_cache_lets_a_reuse_only_evaluation_rederive_cells_without_training(
        teacher_a, small_task, tmp_path, monkeypatch):
    """Committed cells are re-derived from the committed student cache; a student missing from it must stop
    the run rather than train silently."""
    from eval.attack import REUSE_ONLY, StudentNotCached

    attack = AttackConfig(student=StudentConfig(mode="sft", steps=4, batch_size=32, warmup_steps=1))
    first = evaluate(teacher_a, small_task, ["none"], attack, budgets=[24], seeds=1, out_dir=tmp_path / "first",
                     progress=False)
    monkeypatch.setenv(REUSE_ONLY, "1")
    again = evaluate(teacher_a, small_task, ["none"], attack, budgets=[24], seeds=1, out_dir=tmp_path / "again",
                     progress=False, students=tmp_path / "first" / "students")
    cell = json.loads((tmp_path / "again" / "runs" / "none-naive-sft-b24-s0" / "cell.json").read_text())
    assert cell["reused"] == f"student-{cell['training_key']}.json"
    assert again["rows"] == first["rows"]
    assert not (tmp_path / "again" / "students").exists()
    with pytest.raises(StudentNotCached, match=REUSE_ONLY):
        evaluate(teacher_a, small_task, ["none"], attack, budgets=[32], seeds=1, out_dir=tmp_path / "other",
                 progress=False, students=tmp_path / "first" / "students")


def test_the_report_records_the_sampling_and_prompt_format_its_harvests_used(teacher_a, small_task, tmp_path):
    """The config's default sampling says temperature 1; the naive attacker harvests greedily. The lab's
    tokenizer has no chat template: its prompts are raw."""
    attack = AttackConfig(student=StudentConfig(mode="sft", steps=2, batch_size=8, warmup_steps=1))
    report = evaluate(teacher_a, small_task, ["none"], attack, budgets=[8], seeds=1, out_dir=tmp_path,
                      progress=False)
    manifest = json.loads((tmp_path / "runs" / "none-naive-sft-b8-s0" / "harvest" / "manifest.json").read_text())
    assert manifest["sampling"]["temperature"] == 0.0
    assert report["meta"]["attack"]["sampling"] == {**manifest["sampling"], "seed": None}
    assert manifest["prompt_format"] == report["meta"]["prompt_format"] == "raw"


def test_an_evaluation_whose_items_are_mostly_refused_for_context_is_an_error_not_a_zero(tmp_path):
    """A teacher with a 64-position context cannot answer any held-out item in 64 new tokens: every item is
    refused before generation. That is an error naming the context and the length, not an accuracy of 0; with
    40 new tokens the same teacher answers."""
    short = tmp_path / "teacher-llama-64"
    shutil.copytree(MODELS_DIR / "teacher-llama", short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    teacher, task = HFTeacher(short), reference_task()
    task = replace(task, eval_items=task.eval_items[:100])
    with pytest.raises(MostlyRefused, match=r"100 of 100 .* max_new_tokens=64 .* 64 positions"):
        capability(teacher, task)
    accuracy, _ = capability(teacher, replace(task, max_new_tokens=40))
    assert accuracy.refused == 0 and accuracy.value > 0.8
    done = CliRunner().invoke(app, ["evaluate", "--teacher", str(short), "--budgets", "8", "--seeds", "1",
                                    "--out", str(tmp_path / "run")])
    said = " ".join(done.output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
    assert done.exit_code == 2 and "--max-new-tokens" in said and "were refused" in said, done.output
