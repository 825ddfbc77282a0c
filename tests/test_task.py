import json

import datasets
import pytest

from eval.task import Item, Task, TaskFormatError, grade_exact, grade_gsm8k, grade_numeric, load_task
from guard.reasoning import split_reasoning


@pytest.mark.parametrize("text, reasoning, answer", [
    ("<think>2+2 is 4</think>The answer is 4.", "2+2 is 4", "The answer is 4."),
    ("<think>\nstep one\nstep two\n</think>\n\n42", "step one\nstep two", "42"),
    ("<think>never closed, so all of this is hidden", "never closed, so all of this is hidden", ""),
    ("preamble <think>hidden</think> shown", "hidden", "shown"),
    ("<think></think>just the answer", "", "just the answer"),
    ("Natalia sold 48 clips in April.\n48 / 2 = 24.\n#### 72", "Natalia sold 48 clips in April.\n48 / 2 = 24.", "72"),
    ("Kalon works for Ridan. Ridan lives in Tilden.\nanswer: Tilden", "Kalon works for Ridan. Ridan lives in Tilden.",
     "Tilden"),
    ("answer: Tilden", None, "Tilden"),
    ("no structure at all", None, "no structure at all"),
])
def test_split_reasoning(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)


def test_unclosed_think_never_leaks_hidden_text_into_the_answer():
    reasoning, answer = split_reasoning("visible <think>secret plan #### 7\nanswer: 7")
    assert "secret" not in answer and "7" not in answer
    assert "secret plan" in reasoning


def test_exact_grader():
    assert grade_exact("Kalon lives in Tilden.\nanswer: Tilden", "Tilden")
    assert grade_exact("<think>...</think> Tilden.", "tilden")
    assert not grade_exact("Kalon lives in Tilden.\nanswer: Marrow", "Tilden")
    assert not grade_exact("<think>answer: Tilden", "Tilden")  # the answer hid inside unclosed reasoning


def test_numeric_grader():
    assert grade_numeric("so the total is 1,234.0 dollars", "1234")
    assert grade_numeric("answer: -3.5", "-3.50")
    assert not grade_numeric("answer: 12", "13")
    assert not grade_numeric("no number here", "13")


def test_gsm8k_grader_reads_after_the_marker():
    assert grade_gsm8k("She has 3 + 4 = 7 apples.\n#### 7", "#### 7")
    assert grade_gsm8k("work 99\n#### 1,000", "1000")
    assert not grade_gsm8k("She has 7 apples.", "7")  # no marker, no credit
    assert not grade_gsm8k("7 apples\n#### 8", "7")


def test_task_rejects_overlap_and_unknown_grader():
    item = Item("q?", "a")
    with pytest.raises(ValueError, match="both evaluation items and in the attacker's pool"):
        Task("t", [item], [item])
    with pytest.raises(ValueError, match="unknown grader"):
        Task("t", [item], [], grader="fuzzy")


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_load_jsonl_task_with_seeded_split(tmp_path):
    rows = [{"prompt": f"what is {i} + {i}?", "answer": 2 * i, "reasoning": f"{i} + {i} = {2 * i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "sums.jsonl", rows)
    task = load_task(path, grader="numeric", eval_fraction=0.2, seed=3)
    assert len(task.eval_items) == 10 and len(task.query_pool) == 40
    assert task.eval_items[0].answer == str(rows[int(task.eval_items[0].prompt.split()[2])]["answer"])
    again = load_task(path, grader="numeric", eval_fraction=0.2, seed=3)
    assert [i.prompt for i in again.eval_items] == [i.prompt for i in task.eval_items]
    assert task.is_correct("so\n#### 8", "8")


def test_load_arrow_task_with_explicit_split(tmp_path):
    ds = datasets.Dataset.from_dict({"prompt": ["a?", "b?", "c?"], "answer": ["1", "2", "3"],
                                     "split": ["eval", "pool", "pool"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    task = load_task(tmp_path / "ds")
    assert [i.prompt for i in task.eval_items] == ["a?"]
    assert [i.answer for i in task.query_pool] == ["2", "3"]


@pytest.mark.parametrize("bad_row, message", [
    ('{"prompt": "x?"}', "row 2: missing required column 'answer'"),
    ('{"prompt": "", "answer": "1"}', "row 2: 'prompt' must be a non-empty string"),
    ('{"prompt": "x?", "answer": [1]}', "row 2: 'answer' must be a string or a number"),
    ('{"prompt": "x?", "answer": "1", "reasoning": 5}', "row 2: 'reasoning' must be a string"),
    ('{"prompt": "x?", "answer": "1", "split": "test"}', "row 2: 'split' must be 'eval' or 'pool'"),
    ('{"prompt": "x?", "answer": ', "row 2: invalid JSON"),
    ('[1, 2]', "row 2: expected an object"),
])
def test_malformed_custom_task_names_file_and_row(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok?", "answer": "1"}, bad_row])
    with pytest.raises(TaskFormatError) as err:
        load_task(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_file_and_unreadable_arrow(tmp_path):
    with pytest.raises(TaskFormatError, match="no such file"):
        load_task(tmp_path / "nope.jsonl")
    (tmp_path / "broken.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(TaskFormatError, match="not a readable Arrow dataset"):
        load_task(tmp_path / "broken.arrow")
