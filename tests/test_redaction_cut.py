"""A harvester that sets `max_tokens` below the reasoning's length: under every withholding policy, over HTTP
and in process, streamed and not, no intermediate fact reaches it at any length from 1 to 64 tokens.

The facts are the bridge people of two-hop questions: the person a chain passes through, named in the
teacher's reasoning and nowhere in the question. A policy that shows no reasoning must never show one; the
final answer may show only once the answer marker was generated."""

import copy

import openai
import pytest

from conftest import live_server
from eval.attack import AttackConfig, harvest
from eval.reference import plan_or_outline
from eval.reference.world import parse_facts, reference_task
from guard.defenses import DefenseParts, build_defense
from guard.gateway.app import create_app
from guard.hf_teacher import HFTeacher
from guard.reasoning import split_reasoning
from guard.redaction import AnswerOnly, Redact, Sealer, parse_policy
from guard.teacher import GREEDY, Sampling

SPECS = ["answer-only", "summary", "truncate:2", "sealed"]
LENGTHS = range(1, 65)
SEALER = Sealer.generate()


def bridges(prompt: str, reasoning: str, answer: str) -> set[str]:
    """The people a reasoning names that its question and its answer do not: what a withholding policy must
    never show."""
    named = {w.strip(".,?") for w in reasoning.split() if w[:1].isupper()}
    return named - {w.strip(".,?\n") for w in prompt.split()} - {answer}


@pytest.fixture(scope="module")
def questions(teacher_a):
    """Two-hop questions through a person, with their bridges in teacher-a's greedy reasoning."""
    items = [i for i in reference_task().eval_items if "of the" in i.prompt][:3]
    prompts = [i.prompt for i in items]
    whole = teacher_a.complete(prompts, GREEDY)
    secrets = [bridges(p, c.reasoning, c.answer) for p, c in zip(prompts, whole)]
    assert all(secrets) and all(c.finish_reason == "stop" for c in whole)
    return prompts, secrets


def leaks(texts: list[str], secrets: list[set[str]]) -> list[tuple[str, str]]:
    return [(secret, text) for text, ours in zip(texts, secrets) for secret in ours if secret in text]


def served_in_process(teacher, spec: str):
    return build_defense(spec, teacher, DefenseParts(summarize=plan_or_outline, sealer=SEALER))


@pytest.mark.parametrize("spec", SPECS)
def test_no_length_of_max_tokens_leaks_a_fact_in_process(teacher_a, questions, spec):
    prompts, secrets = questions
    served = served_in_process(teacher_a, spec)
    cut_before_the_answer = 0
    for length in LENGTHS:
        completions = served.complete(prompts, Sampling(temperature=0.0, max_new_tokens=length))
        assert not leaks([c.text for c in completions], secrets), (spec, length, completions)
        assert all(c.completion_tokens == length for c in completions if c.finish_reason == "length")  # billed
        cut_before_the_answer += sum("answer:" not in c.text and c.finish_reason == "length" for c in completions)
    assert cut_before_the_answer > 0  # the sweep did cut completions before their marker


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def over_http(client: openai.OpenAI, prompts: list[str], length: int, stream: bool) -> list[str]:
    """What a client reads at `max_tokens=length`: every prompt through completions (one request) and the first
    through chat, each streamed or not."""
    asked = dict(model="teacher-a", temperature=0, max_tokens=length)
    if stream:
        texts = [""] * len(prompts)
        for chunk in client.completions.create(prompt=prompts, stream=True, **asked):
            for choice in chunk.choices:
                texts[choice.index] += choice.text
        chat = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            messages=[{"role": "user", "content": prompts[0]}], stream=True, **asked) if c.choices)
    else:
        texts = [c.text for c in sorted(client.completions.create(prompt=prompts, **asked).choices,
                                        key=lambda c: c.index)]
        chat = client.chat.completions.create(messages=[{"role": "user", "content": prompts[0]}],
                                              **asked).choices[0].message.content or ""
    return texts + [chat]


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_no_length_of_max_tokens_leaks_a_fact_through_the_gateway(teacher_a, questions, spec):
    prompts, secrets = questions
    app = create_app(lambda: teacher_a, "teacher-a", sealer=SEALER, summarize=plan_or_outline,
                     policy=parse_policy(spec, plan_or_outline, SEALER))
    with live_server(app) as url:
        client = sdk(url)
        for length in LENGTHS:
            for stream in (False, True):
                texts = over_http(client, prompts, length, stream)
                assert not leaks(texts, secrets + secrets[:1]), (spec, length, stream, texts)


def thinking(teacher: HFTeacher) -> HFTeacher:
    """teacher-a behind a chat template that opens `<think>` in the prompt, as reasoning models' templates do:
    its completion starts inside the reasoning block, so no marker opens it."""
    tokenizer = copy.deepcopy(teacher.tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}<think>\n"
    return HFTeacher("teacher-a-thinking", model=teacher.model, tokenizer=tokenizer)


@pytest.mark.parametrize("spec", SPECS)
def test_a_template_that_opens_think_in_the_prompt_leaks_no_fact_at_any_length(teacher_a, questions, spec):
    prompts, secrets = questions
    teacher = thinking(teacher_a)
    assert teacher.prompt_format == "chat"
    whole = teacher.complete(prompts, GREEDY)
    assert any(secret in c.text for c, ours in zip(whole, secrets) for secret in ours)  # it still reasons
    served = served_in_process(teacher, spec)
    app = create_app(lambda: teacher, "teacher-a", sealer=SEALER, summarize=plan_or_outline,
                     policy=parse_policy(spec, plan_or_outline, SEALER))
    with live_server(app) as url:
        client = sdk(url)
        for length in LENGTHS:
            in_process = [c.text for c in served.complete(prompts, Sampling(temperature=0.0, max_new_tokens=length))]
            assert not leaks(in_process, secrets), (spec, length, in_process)
            chat = client.chat.completions.create(model="teacher-a", temperature=0, max_tokens=length, messages=[
                {"role": "user", "content": prompts[0]}]).choices[0].message.content or ""
            assert not leaks([chat], secrets[:1]), (spec, length, chat)


class FailsOpen(AnswerOnly):
    """answer-only as it read completions before it failed closed: a completion without a marker was served
    whole, whatever cut it."""

    def split(self, text: str, cut: bool):
        return split_reasoning(text)


def test_the_truncating_harvester_reads_the_reasoning_where_a_policy_fails_open_and_nothing_where_it_fails_closed(
        teacher_a, tmp_path):
    task = reference_task()
    rows = {}
    for name, policy in (("fails-open", FailsOpen()), ("answer-only", AnswerOnly())):
        rows[name], queries = harvest(Redact(teacher_a, policy), task, AttackConfig(strategy="truncating", budget=40),
                                      0, tmp_path / name, name, progress=False)
        assert queries == 40 and len(rows[name]) == 20  # two queries a question: whole, then cut short
    open_texts, closed_texts = ([r["text"] for r in rows[n]] for n in ("fails-open", "answer-only"))
    # where the policy failed open, the rows are the teacher's reasoning (facts of the world, parsed) with the
    # answer asked for separately; where it fails closed, answers alone
    assert sum(bool(parse_facts(split_reasoning(r)[0] or "")) for r in open_texts) >= 18, open_texts[:3]
    assert all(r.startswith("answer: ") and ". " not in r for r in closed_texts), closed_texts[:3]
    assert [r.split("answer: ")[-1] for r in open_texts] == [r.split("answer: ")[-1] for r in closed_texts]
