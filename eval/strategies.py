"""Attacker strategies: how a harvest is gathered, and which training rows it yields.

A strategy asks its questions through a `Harvester` (which enforces the budget and makes the harvest
resumable) and returns (prompt, Completion) training rows for the student: completions as served, or
ones the attacker wrote itself. Strategies must be deterministic
given their seed and the answers they receive, so a resumed harvest replays exactly.
"""

from __future__ import annotations

import numpy as np

from eval.harvest import Harvester, Strategy
from eval.reference.world import Question, Style, format_prompt, parse_facts, parse_question, write_chain
from eval.task import Task
from guard.reasoning import has_marker
from guard.teacher import Completion


def naive(task: Task, seed: int) -> Strategy:
    """Ask questions from the attacker's pool in a seeded random order (repeating once it runs out),
    and keep each completion as served."""

    def run(harvester: Harvester) -> list[tuple[str, Completion]]:
        rng = np.random.default_rng(seed)
        pool = [item.prompt for item in task.query_pool]
        prompts = []
        while len(prompts) < harvester.budget.queries:
            prompts += [pool[i] for i in rng.permutation(len(pool))]
        prompts = prompts[: harvester.budget.queries]
        return list(zip(prompts, harvester.ask(prompts)))

    return run


def decompose(task: Task, seed: int, batch: int = 64) -> Strategy:
    """Ask only 1-hop sub-questions and write each 2-hop chain out by hand from their answers.

    Needs nothing but final answers from the teacher, so hiding reasoning does not stop it. Each
    distinct sub-question is asked once. Reference task only: it knows how its questions compose.
    """
    if task.name != "reference":
        raise ValueError(f"the decompose strategy knows only the reference task's questions, not {task.name!r}")

    def run(harvester: Harvester) -> list[tuple[str, Completion]]:
        rng = np.random.default_rng(seed)
        questions = [parse_question(item.prompt) for item in task.query_pool]
        two_hop = [q for q in questions if len(q.hops) == 2]
        known: dict[Question, str] = {}  # a 1-hop question and the teacher's answer to it
        served: dict[Question, Completion] = {}  # ... and the completion itself, kept as a training row too

        def learn(wanted: list[Question]) -> None:
            todo = list(dict.fromkeys(q for q in wanted if q not in known))
            for q, completion in zip(todo, harvester.ask([format_prompt(q.text) for q in todo])):
                if completion.finish_reason != "refused":  # a refusal is no fact; building on it teaches nonsense
                    known[q], served[q] = completion.answer, completion

        rows, order = [], [two_hop[i] for i in rng.permutation(len(two_hop))]
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            learn([Question(q.person, q.hops[:1]) for q in chunk])
            learn([Question(known[first], q.hops[1:]) for q in chunk
                   if (first := Question(q.person, q.hops[:1])) in known])
            for q in chunk:
                first = Question(q.person, q.hops[:1])
                if first in known and (second := Question(known[first], q.hops[1:])) in known:
                    steps = [(q.person, q.hops[0], known[first]), (known[first], q.hops[1], known[second])]
                    rows.append((format_prompt(q.text), Completion(text=write_chain(steps))))
            if harvester.queries_left <= 0:
                break
        return [(format_prompt(q.text), completion) for q, completion in served.items()] + rows

    return run


def paraphrase(task: Task, seed: int) -> Strategy:
    """The naive harvest with every reasoning chain rewritten before training: the same facts, each in a
    phrasing drawn uniformly, so none of the teacher's word choices (where a watermark lives) survive.
    Reference task only; a completion whose facts cannot be parsed is kept as served."""
    if task.name != "reference":
        raise ValueError(f"the paraphrase strategy knows only the reference task's phrasings, not {task.name!r}")
    harvest = naive(task, seed)

    def run(harvester: Harvester) -> list[tuple[str, Completion]]:
        rng, style = np.random.default_rng(seed + 1), Style(seed, sharpness=0.0)
        rows = []
        for prompt, completion in harvest(harvester):
            steps = parse_facts(completion.reasoning or "")
            rows.append((prompt, Completion(text=write_chain(steps, style, rng)) if steps else completion))
        return rows

    return run


def truncating(task: Task, seed: int, drop: int = 8) -> Strategy:
    """Read the reasoning through a short `max_tokens`: each question is asked whole (for its answer, and for
    the tokens its completion is billed, hidden ones included), then again with `max_tokens` `drop` tokens short
    of that, which cuts the completion before its answer marker. A policy that serves an unmarked completion
    whole shows the reasoning in the cut one; the training row is then that reasoning and the whole answer,
    else the whole completion as served. Two queries a question, in the naive order."""

    def run(harvester: Harvester) -> list[tuple[str, Completion]]:
        rng = np.random.default_rng(seed)
        pool = [item.prompt for item in task.query_pool]
        order = []
        while len(order) < harvester.budget.queries // 2:
            order += [pool[i] for i in rng.permutation(len(pool))]
        order, rows = order[: harvester.budget.queries // 2], []
        for start in range(0, len(order), harvester.chunk_size):
            chunk = order[start:start + harvester.chunk_size]
            whole = harvester.ask(chunk)
            lengths = [max(1, (c.completion_tokens or 1) - drop) for c in whole]
            cut: dict[int, Completion] = {}
            for length in sorted(set(lengths)):  # one request per length, shortest first: deterministic
                asked = [i for i, n in enumerate(lengths) if n == length and whole[i].finish_reason != "refused"]
                cut.update(zip(asked, harvester.ask([chunk[i] for i in asked], max_new_tokens=length)))
            for i, c in enumerate(whole):
                read = cut.get(i)
                leaked = read is not None and read.text.strip() and not has_marker(read.text)
                rows.append((chunk[i], Completion(text=f"{read.text.strip()}\nanswer: {c.answer}") if leaked else c))
            if harvester.queries_left <= 0:
                break
        return rows

    return run


STRATEGIES = {"naive": naive, "decompose": decompose, "paraphrase": paraphrase, "truncating": truncating}
# What each attacker asks for when not told: the single most likely answer. Sampled answers carry the
# teacher's slips, which the student learns too, so a strong attacker asks greedily.
DEFAULT_TEMPERATURE = {"naive": 0.0, "decompose": 0.0, "paraphrase": 0.0, "truncating": 0.0}
