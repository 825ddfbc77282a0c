"""The reference world: fictional people, their relations and attributes, and the reference task.

A teacher memorises every 1-hop fact ("Kavro lives in Tilden") and sees worked reasoning for part of
the 2-hop compositions ("where does the boss of Kavro live?"). The evaluation items are 2-hop
compositions it never saw, so capability means composing memorised facts -- which small transformers
do well with the intermediate fact written out and poorly without it.

Every fact can be phrased many ways, and a teacher has its own preferences among the phrasings
(its *style*), so sampled answers carry entropy for a watermark and a fingerprint for provenance.
Everything is a pure function of the seeds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from eval.task import Item, Task

RELATIONS = ("boss", "friend", "mentor")
ATTRIBUTES = {
    "city": ("Tilden", "Marrow", "Quenby", "Ostrava", "Belloc", "Harwick", "Sunmere", "Dunlow",
             "Corvale", "Pellin", "Ashby", "Fennick", "Gorsett", "Lindqvale", "Rookmoor", "Velmar"),
    "job": ("baker", "carpenter", "doctor", "farmer", "gardener", "lawyer", "mechanic", "nurse",
            "painter", "pilot", "plumber", "sailor", "tailor", "teacher", "writer", "weaver"),
    "pet": ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "ferret",
            "canary", "lizard", "tortoise", "pony"),
}

# Questions have one phrasing each: the attacker's pool and the evaluation items share it.
ATTRIBUTE_QUESTION = {"city": "where does {x} live?", "job": "what does {x} do for a living?",
                      "pet": "what pet does {x} keep?"}
RELATION_QUESTION = "who is the {r} of {x}?"

# Twelve phrasings per fact; {x} is the subject, {v} the value. No phrasing fits two fact types,
# so every reasoning step stays checkable by `parse_facts`.
FACT_TEMPLATES = {
    "boss": ("the boss of {x} is {v}.", "{x} works for {v}.", "{x} reports to {v}.",
             "{v} is the boss of {x}.", "{v} manages {x}.", "{x} is managed by {v}.",
             "{x} answers to {v}.", "{v} supervises {x}.", "{x} has {v} as a boss.",
             "{v} runs the team of {x}.", "{x} takes orders from {v}.", "the manager of {x} is {v}."),
    "friend": ("the friend of {x} is {v}.", "{x} is friends with {v}.", "{v} is a friend of {x}.",
               "{x} hangs out with {v}.", "{x} often meets {v}.", "{x} calls {v} a friend.",
               "{x} spends weekends with {v}.", "the closest friend of {x} is {v}.",
               "{x} counts {v} as a friend.", "{v} befriended {x}.", "{x} trusts {v} as a friend.",
               "{x} shares lunch with {v}."),
    "mentor": ("the mentor of {x} is {v}.", "{x} is mentored by {v}.", "{v} mentors {x}.",
               "{x} learns from {v}.", "{v} guides {x}.", "{x} is coached by {v}.",
               "{v} is the mentor of {x}.", "{x} studies under {v}.", "{v} teaches {x}.",
               "{x} was trained by {v}.", "{x} looks up to {v} as a mentor.", "{v} advises {x}."),
    "city": ("{x} lives in {v}.", "{x} resides in {v}.", "{x} is based in {v}.",
             "the home of {x} is {v}.", "{x} calls {v} home.", "{x} has a house in {v}.",
             "{x} dwells in {v}.", "{v} is where {x} lives.", "{x} settled in {v}.",
             "the city of {x} is {v}.", "{x} makes a home in {v}.", "{x} stays in {v}."),
    "job": ("{x} works as a {v}.", "{x} is a {v}.", "the job of {x} is {v}.",
            "{x} earns a living as a {v}.", "by trade {x} is a {v}.", "{x} is employed as a {v}.",
            "the profession of {x} is {v}.", "{x} makes money as a {v}.", "{x} has a job as a {v}.",
            "{x} trained to be a {v}.", "{v} is the job of {x}.", "{x} serves as a {v}."),
    "pet": ("{x} keeps a {v}.", "{x} owns a {v}.", "the pet of {x} is a {v}.", "{x} has a pet {v}.",
            "{x} looks after a {v}.", "a {v} lives with {x}.", "{x} cares for a {v}.",
            "the animal of {x} is a {v}.", "{x} adopted a {v}.", "{x} feeds a {v}.",
            "{x} lives with a {v}.", "{x} is never without a {v}."),
}
OPENERS = ("", "let me think.", "okay.", "step by step.", "well,", "let us see.",
           "thinking it through.", "first,")
CONNECTIVES = ("", "then", "so", "and", "next,", "also", "in turn", "now")
CLOSERS = ("", "that settles it.", "done.", "so that is it.", "simple enough.", "that is the fact.",
           "nothing more to it.", "easy.")
ANSWER_PREFIX = "answer: "

SYLLABLES_START = ("Ka", "Bo", "Ri", "Te", "Mo", "Sa", "Lu", "Ve", "Do", "Ni", "Fa", "Go", "Pe", "Zu")
SYLLABLES_MID = ("ra", "lo", "mi", "ve", "dan", "ri", "to", "sel", "na", "bu", "ket", "or")
SYLLABLES_END = ("n", "k", "s", "th", "l", "x", "m", "d")


def _template_regex(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{x\}", r"(?P<x>\S+)").replace(r"\{v\}", r"(?P<v>\S+)")
    return re.compile(escaped)


FACT_PATTERNS = [(kind, index, _template_regex(t)) for kind, ts in FACT_TEMPLATES.items()
                 for index, t in enumerate(ts)]
LEADING_WORDS = re.compile(r"^\s*(?:" + "|".join(re.escape(w) for w in CONNECTIVES + OPENERS if w) + r")\s*")


def parse_statements(reasoning: str) -> list[tuple[str, str, str, int]]:
    """Every fact stated in a reasoning text, in order, as (subject, hop, value, template index)."""
    found = []
    for sentence in re.findall(r"[^.]*\.", reasoning):
        sentence = LEADING_WORDS.sub("", sentence.strip()).strip()
        for kind, index, pattern in FACT_PATTERNS:
            match = pattern.fullmatch(sentence)
            if match:
                found.append((match["x"], kind, match["v"], index))
                break
    return found


def parse_facts(reasoning: str) -> list[tuple[str, str, str]]:
    """Every (subject, relation-or-attribute, value) stated in a reasoning text, in order."""
    return [(x, kind, v) for x, kind, v, _ in parse_statements(reasoning)]


def phrasing_counts(texts: list[str]) -> dict[str, np.ndarray]:
    """How often each phrasing of each fact type appears in `texts`: a teacher's stylistic fingerprint."""
    counts = {kind: np.zeros(len(ts), dtype=int) for kind, ts in FACT_TEMPLATES.items()}
    for text in texts:
        for _, kind, _, index in parse_statements(text):
            counts[kind][index] += 1
    return counts


@dataclass(frozen=True)
class Style:
    """A teacher's phrasing preferences: a categorical weight per phrasing in every slot."""

    seed: int
    sharpness: float = 0.7  # log-weights ~ N(0, sharpness^2): mild preferences keep entropy high

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        slots = {"opener": OPENERS, "connective": CONNECTIVES, "closer": CLOSERS, **FACT_TEMPLATES}
        out = {}
        for name, options in slots.items():
            logits = rng.normal(0.0, self.sharpness, len(options))
            out[name] = np.exp(logits) / np.exp(logits).sum()
        return out

    def pick(self, slot: str, options: tuple[str, ...], rng: np.random.Generator) -> str:
        return options[rng.choice(len(options), p=self.weights[slot])]


def make_names(count: int, rng: np.random.Generator) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        names.add(rng.choice(SYLLABLES_START) + rng.choice(SYLLABLES_MID) + rng.choice(SYLLABLES_END))
    return sorted(names)


@dataclass(frozen=True)
class Question:
    """A chain of hops from a person: ("boss", "city") is "where does the boss of X live?"."""

    person: str
    hops: tuple[str, ...]

    @property
    def text(self) -> str:
        *relations, last = self.hops
        subject = self.person
        for relation in relations:
            subject = f"the {relation} of {subject}"
        if last in ATTRIBUTES:
            return ATTRIBUTE_QUESTION[last].format(x=subject)
        return RELATION_QUESTION.format(r=last, x=subject)


class World:
    """People with three relations and three attributes, drawn from `seed`."""

    def __init__(self, num_people: int = 200, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.people = make_names(num_people, rng)
        self.facts: dict[tuple[str, str], str] = {}
        for relation in RELATIONS:
            for i, person in enumerate(self.people):
                other = rng.integers(num_people - 1)
                self.facts[person, relation] = self.people[other + (other >= i)]  # never oneself
        for attribute, values in ATTRIBUTES.items():
            for person in self.people:
                self.facts[person, attribute] = values[rng.integers(len(values))]

    def chain(self, question: Question) -> list[tuple[str, str, str]]:
        """The facts that answer `question`, as (subject, hop, value) triples."""
        steps, subject = [], question.person
        for hop in question.hops:
            value = self.facts[subject, hop]
            steps.append((subject, hop, value))
            subject = value
        return steps

    def answer(self, question: Question) -> str:
        return self.chain(question)[-1][2]

    def one_hop_questions(self) -> list[Question]:
        return [Question(p, (h,)) for p in self.people for h in (*RELATIONS, *ATTRIBUTES)]

    def two_hop_questions(self) -> list[Question]:
        return [Question(p, (r, h)) for p in self.people for r in RELATIONS
                for h in (*RELATIONS, *ATTRIBUTES)]

    def render(self, question: Question, style: Style, rng: np.random.Generator) -> str:
        """One sampled teacher completion: reasoning with every intermediate fact, then the answer."""
        return write_chain(self.chain(question), style, rng)


def write_chain(steps: list[tuple[str, str, str]], style: Style | None = None,
                rng: np.random.Generator | None = None) -> str:
    """Reasoning that states each (subject, hop, value) step, then the answer line.

    With a style, phrasings are sampled from its preferences; without one, each fact takes its first,
    plainest phrasing (as an attacker assembling a chain by hand would write it).
    """
    def pick(slot, options):
        return style.pick(slot, options, rng) if style is not None else options[0]

    parts = [pick("opener", OPENERS)]
    for i, (subject, hop, value) in enumerate(steps):
        if i:
            parts.append(pick("connective", CONNECTIVES))
        parts.append(pick(hop, FACT_TEMPLATES[hop]).format(x=subject, v=value))
    parts.append(pick("closer", CLOSERS))
    return " ".join(p for p in parts if p) + "\n" + ANSWER_PREFIX + steps[-1][2]


def format_prompt(question_text: str) -> str:
    return f"question: {question_text}\n"


def _question_regexes() -> list[tuple[re.Pattern, str | None]]:
    subject = r"(?P<subject>(?:the (?:boss|friend|mentor) of )*\S+)"
    out = [(re.compile("question: " + re.escape(t).replace(r"\{x\}", subject) + "\n?"), hop)
           for hop, t in ATTRIBUTE_QUESTION.items()]
    out.append((re.compile(r"question: who is the (?P<hop>boss|friend|mentor) of " + subject + r"\?\n?"), None))
    return out


QUESTION_REGEXES = _question_regexes()


def parse_question(prompt: str) -> Question | None:
    """The Question a reference-task prompt asks, or None if it is not one."""
    for regex, hop in QUESTION_REGEXES:
        match = regex.fullmatch(prompt)
        if match:
            *relations, person = re.split(r" of ", match["subject"].removeprefix("the "))
            relations = [r.removeprefix("the ") for r in relations]
            return Question(person, (*reversed(relations), hop or match["hop"]))
    return None


def plan(prompt: str) -> str | None:
    """The plan for answering a reference question, without any fact it needs; None for other prompts."""
    question = parse_question(prompt)
    if question is None:
        return None
    steps, subject = [], question.person
    for hop in question.hops:
        steps.append(f"the {hop} of {subject}")
        subject = "that person"
    return "plan: look up " + ", then ".join(steps) + "."


@dataclass(frozen=True)
class Split:
    """Which 2-hop compositions the teacher is taught, which are held out, and what attackers may ask."""

    teacher_two_hop: list[Question]
    held_out: list[Question]
    attacker_pool: list[Question]


def split_world(world: World, held_out: int = 600, teacher_fraction: float = 0.5,
                seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    two_hop = world.two_hop_questions()
    order = rng.permutation(len(two_hop))
    held = [two_hop[i] for i in order[:held_out]]
    rest = [two_hop[i] for i in order[held_out:]]
    taught = rest[: int(len(rest) * teacher_fraction)]
    # The attacker may ask anything that is not an evaluation item: every 1-hop fact and every
    # other 2-hop composition, including ones the teacher was never shown worked out.
    return Split(teacher_two_hop=taught, held_out=held, attacker_pool=world.one_hop_questions() + rest)


REFERENCE_WORLD_SEED = 0


def reference_world() -> World:
    return World(num_people=200, seed=REFERENCE_WORLD_SEED)


def reference_task(world: World | None = None) -> Task:
    """The built-in task: held-out 2-hop questions, graded by exact match on the answer line."""
    world = world or reference_world()
    split = split_world(world)

    def item(q: Question, kind: str) -> Item:
        return Item(prompt=format_prompt(q.text), answer=world.answer(q), kind=kind)

    return Task(
        name="reference",
        eval_items=[item(q, "2hop") for q in split.held_out],
        query_pool=[item(q, f"{len(q.hops)}hop") for q in split.attacker_pool],
        grader="exact",
    )


def one_hop_items(world: World | None = None) -> list[Item]:
    world = world or reference_world()
    return [Item(format_prompt(q.text), world.answer(q), kind="1hop") for q in world.one_hop_questions()]
