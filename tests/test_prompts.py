"""Prompt formatting: a model is read the way it was asked, everywhere a prompt is tokenized.

Two tokenizer conventions, both from the lab's own BPE: GPT-2's (no special tokens added) and Llama's (a BOS
on every text, `eval.reference.build.with_bos`), each given a chat template; the Llama one's
template starts with the BOS token, as Llama 3's does, so a second BOS would show."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from eval.metrics import capability
from eval.reference import MODELS_DIR
from eval.reference.world import reference_task
from eval.student import kd_set
from eval.trainer import IGNORE, tokenize_pairs
from guard.hf_teacher import HFTeacher, load_causal_lm
from guard.prompts import Conversation, prompt_ids
from guard.teacher import Sampling
from watermark.detect import WatermarkDetector
from watermark.kgw import GreenList, WatermarkConfig, WatermarkKey

# the lab's models see 128 positions: a terse template, so that a three-turn conversation fits
CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
PROMPTS = ["question: where does Kalon live?\n", "question: who is the boss of the boss of Vemim?\n", "hi"]


def chat_teacher(style: str) -> HFTeacher:
    """A lab model given a chat template: teacher-a (GPT-2, its tokenizer adds nothing) or teacher-llama
    (Llama, its tokenizer adds BOS; the template writes BOS itself)."""
    name = {"gpt2": "teacher-a", "llama": "teacher-llama"}[style]
    model, tokenizer = load_causal_lm(MODELS_DIR / name)
    tokenizer.chat_template = ("{{ bos_token }}" if style == "llama" else "") + CHAT
    return HFTeacher(name, model=model, tokenizer=tokenizer)


def transformers_greedy(teacher: HFTeacher, messages: list[dict], max_new_tokens: int = 24) -> str:
    """transformers' own path: apply_chat_template, then greedy generate, one conversation at a time."""
    tok = teacher.tokenizer
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = teacher.model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    return tok.decode(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new, skip_special_tokens=True)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_greedy_output_through_the_teacher_equals_transformers_chat_template_and_generate(style):
    teacher = chat_teacher(style)
    conversation = Conversation(PROMPTS[1], [{"role": "user", "content": PROMPTS[0]},
                                             {"role": "assistant", "content": "answer: Harwick"},
                                             {"role": "user", "content": PROMPTS[1]}])
    prompts = [*PROMPTS, conversation]
    served = [c.text for c in teacher.complete(prompts, Sampling(temperature=0, max_new_tokens=24))]  # one padded batch
    expected = [transformers_greedy(teacher, conversation.messages if p is conversation else
                                    [{"role": "user", "content": p}]) for p in prompts]
    assert served == expected
    assert teacher.prompt_format == "chat"
    bos = teacher.tokenizer.bos_token_id
    assert [ids.count(bos) for ids in prompt_ids(teacher.tokenizer, PROMPTS)] == [1 if style == "llama" else 0] * 3


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_training_rows_detection_and_reading_format_prompts_as_the_teacher_does(style):
    teacher = chat_teacher(style)
    tok = teacher.tokenizer
    served = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True)
              ["input_ids"] for p in PROMPTS]
    answers = ["answer: Harwick", "answer: Vemim", "hello"]
    rows = tokenize_pairs(tok, PROMPTS, answers)
    for row, ids, answer in zip(rows, served, answers):  # the student learns to answer the prompt as served
        assert row["input_ids"][:len(ids)] == ids
        assert row["labels"][:len(ids)] == [IGNORE] * len(ids)
        assert tok.decode(row["input_ids"][len(ids):], skip_special_tokens=True) == answer
    kd = kd_set([{"prompt": p, "text": a, "token_ids": [], "top_ids": [[1]], "top_logprobs": [[0.0]]}
                 for p, a in zip(PROMPTS, answers)], tok, 128)
    assert [r[:len(ids)] for r, ids in zip(kd["input_ids"], served)] == served
    detector = WatermarkDetector(GreenList(WatermarkKey(b"k" * 16), len(tok), WatermarkConfig()), tokenizer=tok)
    sequences, prompt_lengths = detector.tokenize(answers, PROMPTS)  # radioactivity reading uses the same pairs
    assert prompt_lengths == [len(ids) for ids in served]
    assert [s[:n] for s, n in zip(sequences, prompt_lengths)] == served


def test_serving_raw_drops_the_template_from_the_teachers_own_tokenizer_only():
    templated = chat_teacher("llama")
    raw = HFTeacher("teacher-llama", model=templated.model, tokenizer=templated.tokenizer, chat=False)
    assert (raw.prompt_format, templated.prompt_format) == ("raw", "chat")
    assert templated.tokenizer.chat_template and not raw.tokenizer.chat_template
    assert prompt_ids(raw.tokenizer, ["hi"]) == [raw.tokenizer("hi")["input_ids"]]  # the tokenizer's BOS, no template
    with pytest.raises(ValueError, match="no chat template"):
        HFTeacher("teacher-a", model=templated.model, tokenizer=copy.deepcopy(raw.tokenizer), chat=True)


@torch.no_grad()
def test_a_teacher_trained_with_bos_keeps_its_accuracy_when_served():
    """teacher-llama was trained with BOS before every prompt (its tokenizer's convention). Served, the model
    reads exactly the prompt ids it was trained on (caught at its embedding layer), so its accuracy is the
    one measured feeding the trainer's own prompt ids to `generate`."""
    teacher = HFTeacher(MODELS_DIR / "teacher-llama")
    task = reference_task()
    items = task.eval_items[:200]
    tok = teacher.tokenizer
    seen = []
    hook = teacher.model.get_input_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        served, _ = capability(teacher, task, items)
    finally:
        hook.remove()
    prefill = seen[0].tolist()  # the first call holds the whole left-padded prompt batch (pad: EOS, never in a prompt)
    read = [row[next(i for i, t in enumerate(row) if t != tok.pad_token_id):] for row in prefill]

    def accuracy_reading(ids_per_prompt: list[list[int]]) -> float:
        batch = tok.pad({"input_ids": ids_per_prompt}, return_tensors="pt", padding_side="left")
        out = teacher.model.generate(**batch, do_sample=False, max_new_tokens=64, pad_token_id=tok.eos_token_id)
        new = [row[batch["input_ids"].shape[1]:] for row in out.tolist()]
        texts = [tok.decode(ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids) for ids in new]
        return float(np.mean([task.is_correct(t, i.answer) for t, i in zip(texts, items)]))

    rows = tokenize_pairs(tok, [i.prompt for i in items], ["x"] * len(items))
    as_trained = [[t for t, label in zip(r["input_ids"], r["labels"]) if label == IGNORE] for r in rows]
    assert all(ids[0] == tok.bos_token_id for ids in as_trained)
    assert read == as_trained[:len(read)]
    assert served.value == accuracy_reading(as_trained)
