"""Simulated API traffic, on a simulated clock: benign personas and distillation attackers for tests,
benchmarks and threshold calibration; the attacker's traffic shape through a served teacher; and the
replay of benign traffic through a deployment, to measure what a defence that remembers callers costs
benign users.

Benign personas:
- `human`: a few requests a day in daytime sessions (Poisson arrivals under a diurnal rate), about code
  and prose;
- `power`: a heavy interactive user, same shape, many more requests;
- `batch`: a legitimate high-volume customer running one narrow templated job in regular bursts;
- `student`: asks the teacher's own task questions (the reference world's facts, 1-hop and 2-hop) at human
  pace, about popular people far more than rare ones (Zipf popularity), repeating and rephrasing itself,
  with some other questions besides; each stops after a few to a few hundred questions;
- `evaluator`: a legitimate customer who runs a benchmark of a few hundred task questions once, drawn
  uniformly over the task, at a scripted pace: the hard case, since it asks what a harvester asks, as a
  harvester does, and differs only in stopping;
- `followup`: a student who, when an answer names a person, asks one or two things about that person and
  moves on: people ask about what they were just told, which is answer chaining done benignly.

Attackers (questions from the reference task's attacker pool, each worded by a script that draws from many
wordings, as a competent distiller's would):
- `naive`: bulk harvest at a steady scripted rate;
- `cot`: the same, each prompt asking for every intermediate step;
- `slow`: under a per-key rate limit, jittered, around the clock;
- `sybil`: K accounts that each stay under every per-account threshold, sharing a template, a start time
  and a payment fingerprint;
- `swarm`: `swarm_accounts` accounts (100 by default) that split the harvest between them with no question
  asked twice, each with its own payment and network, run by one script from the same few minutes;
- `hydra`: attack prompts mixed into a legitimate power user's account;
- `mimic`: replays a heavy student's timing and its own questions, and swaps half of them for harvest;
- `decompose`: only 1-hop sub-questions, from which the attacker writes the 2-hop chains itself: the first hop
  of 64 of the pool's 2-hop questions, then the second hop about each answer (`eval.strategies.decompose`);
- `spread`: the attack this detector does not stop: the harvest split over `spread_accounts` accounts (5)
  that each ask no more than an evaluation customer does, each with its own payment, network and wording,
  started hours apart at their own scripted pace.

Every event carries the teacher's response: the worked answer (`write_chain`) to a task question, a sentence
of prose to anything else.

Wordings: each account has its own habits (a few of the many phrasings, reused), so reusing a wording is
common among benign users too; the lab format (`question: ...`) is one phrasing among them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from detectors.detector import TrafficDetector
from detectors.events import Event
from eval.metrics import Accuracy
from eval.personas import ATTACKERS, BENIGN
from eval.prose import human_prose
from eval.reference.world import (ATTRIBUTES, RELATIONS, Question, reference_world, split_world,
                                  write_chain)
from eval.task import Task
from guard.teacher import Caller, Completion, Sampling, Teacher

DAY = 86_400.0
SAME_DOMAIN = ("student", "evaluator", "followup")  # benign users who ask the teacher's task questions
# What detectors are fitted on by default: half of it (390 clients) is held out to calibrate, enough to
# resolve a 1% false-positive rate with a threshold above the third-highest held-out score. Same-domain
# users are part of it: a detector must not learn that asking the task's questions is suspect.
BENIGN_POPULATION = {"human": 240, "power": 80, "batch": 80, "student": 300, "evaluator": 80, "followup": 100}
ZIPF = 1.1  # popularity exponent of the world's people among benign askers

ASKS = ("Summarize this in two sentences: {p}", "What does this mean, in plain words? {p}",
        "Rewrite this paragraph so a beginner understands it: {p}", "List the key points of: {p}",
        "Is this statement accurate? {p}", "Write a short reply to this message: {p}",
        "Translate into French: {s}", "Give me three questions a reader might ask about: {s}",
        "Fix the grammar: {s}", "Suggest a title for: {s}")
TOPICS = ("python", "rust", "sql", "excel", "linux", "docker", "git", "css", "regex", "pandas")
QUESTIONS = ("How do I {v} in {t}?", "Why does {t} fail when I {v}?", "What is the fastest way to {v} with {t}?",
             "Can you explain how to {v} using {t}, with an example?")
VERBS = ("sort a list", "read a file", "join two tables", "parse dates", "remove duplicates", "merge branches",
         "write a unit test", "profile memory", "split a string", "schedule a job")
JOBS = ("Classify the sentiment of this customer review as positive, negative or neutral: {s}",
        "Extract every product name mentioned in: {s}", "Translate this support ticket into German: {s}",
        "Tag this document with up to three topics: {s}", "Write a one-line summary of this changelog entry: {s}")
COT_PREFIXES = ("Think step by step and write out every intermediate fact before answering. ",
                "Show your full reasoning, each step on its own line, then the answer. ",
                "Explain your chain of thought in detail: ")

# Ways to ask for one fact of the reference world: {x} is the subject ("Kavro", "the boss of Kavro"), {r} a
# relation. Each account draws a few of these and of the wrappers below, and sticks to them.
FORMS = {
    "city": ("where does {x} live?", "which city does {x} live in?", "where is {x} based?",
             "what is the home town of {x}?", "in which city does {x} live?"),
    "job": ("what does {x} do for a living?", "what is the job of {x}?", "what work does {x} do?",
            "what is the occupation of {x}?", "how does {x} earn a living?"),
    "pet": ("what pet does {x} keep?", "what animal does {x} have?", "which pet does {x} own?",
            "what kind of pet does {x} look after?", "what is the pet of {x}?"),
    "relation": ("who is the {r} of {x}?", "who is {x}'s {r}?", "name the {r} of {x}.",
                 "tell me who the {r} of {x} is.", "who acts as the {r} of {x}?"),
}
WRAPPERS = ("question: {q}\n", "{Q}", "Q: {Q}", "quick question: {q}", "{Q} thanks!", "Do you know {q}",
            "I need to know {q}", "hey, {q}", "{Q} (for my notes)", "Please answer: {Q}", "{Q} Answer briefly.",
            "Can you help? {Q}", "{Q} I forgot.", "My homework asks: {q}", "Fact check: {q}")


class Habits:
    """An account's way of wording the task's questions: a few forms per fact type and a few wrappers. `said`
    records the question each wording asks (for the simulator's responses)."""

    def __init__(self, rng, forms: int = 2, wrappers: int = 3, said: dict[str, Question] | None = None):
        self.rng, self.said = rng, said
        self.forms = {kind: [options[i] for i in rng.choice(len(options), min(forms, len(options)), replace=False)]
                      for kind, options in FORMS.items()}
        self.wrappers = [WRAPPERS[i] for i in rng.choice(len(WRAPPERS), wrappers, replace=False)]

    def pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def word(self, question: Question) -> str:
        *relations, last = question.hops
        subject = question.person
        for relation in relations:
            subject = f"the {relation} of {subject}"
        form = self.pick(self.forms[last if last in ATTRIBUTES else "relation"])
        q = form.format(x=subject, r=last)
        text = self.pick(self.wrappers).format(q=q, Q=q[0].upper() + q[1:])
        if self.rng.random() < 0.05:  # typed in a hurry
            text = text.lower().rstrip("?.!\n")
        if self.said is not None:
            self.said[text] = question
        return text


def popularity_order(seed: int = 0) -> list[str]:
    """The world's people from most to least asked about by benign users (fixed for the lab)."""
    people = reference_world().people
    return [people[i] for i in np.random.default_rng(10_000 + seed).permutation(len(people))]


class PromptSource:
    """Benign prompts from templates filled with real prose; the reference world's questions, asked by benign
    users with Zipf popularity and by harvesters uniformly over the attacker pool."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        paragraphs = human_prose(max_chars=400_000)
        self.paragraphs = [p[:400] for p in paragraphs]
        self.sentences = [s.strip() + "." for p in paragraphs for s in p.split(". ") if 30 < len(s) < 200]
        self.world = world = reference_world()
        self.pool_questions = split_world(world).attacker_pool
        self.one_hop_questions = world.one_hop_questions()
        self.all_questions = self.one_hop_questions + world.two_hop_questions()
        self.popular = popularity_order()
        weights = 1 / np.arange(1, len(self.popular) + 1) ** ZIPF
        self.popularity = weights / weights.sum()

    def pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def benign(self) -> str:
        if self.rng.random() < 0.5:
            return self.pick(ASKS).format(p=self.pick(self.paragraphs), s=self.pick(self.sentences))
        return self.pick(QUESTIONS).format(v=self.pick(VERBS), t=self.pick(TOPICS))

    def job(self, template: str) -> str:
        return template.format(s=self.pick(self.sentences))

    def curious(self) -> Question:
        """A benign user's question: about a popular person, 1-hop more often than 2-hop."""
        person = self.popular[int(self.rng.choice(len(self.popular), p=self.popularity))]
        hops = (*RELATIONS, *ATTRIBUTES)
        if self.rng.random() < 0.6:
            return Question(person, (self.pick(hops),))
        return Question(person, (self.pick(RELATIONS), self.pick(hops)))

    def student(self, count: int, habits: Habits, task_share: float) -> list[str]:
        """A same-domain user's `count` prompts: popular people, repeats and rephrasings, some other asks."""
        asked: list[Question] = []
        prompts = []
        for _ in range(count):
            if self.rng.random() > task_share:
                prompts.append(self.benign())
                continue
            again = asked and self.rng.random() < 0.15  # asks again, usually in other words
            question = self.pick(asked) if again else self.curious()
            asked.append(question)
            prompts.append(habits.word(question))
        return prompts

    def followup(self, count: int, habits: Habits, task_share: float) -> list[str]:
        """A same-domain user's `count` prompts who, when an answer names a person, asks one or two things about
        that person most of the time, then moves on."""
        prompts: list[str] = []
        while len(prompts) < count:
            if self.rng.random() > task_share:
                prompts.append(self.benign())
                continue
            question = self.curious()
            prompts.append(habits.word(question))
            if question.hops[-1] in RELATIONS and self.rng.random() < 0.8:
                person = self.world.answer(question)
                for _ in range(int(self.rng.integers(1, 3))):
                    prompts.append(habits.word(Question(person, (self.pick((*RELATIONS, *ATTRIBUTES)),))))
        return prompts[:count]

    def decompose(self, count: int, habits: Habits, batch: int = 64) -> list[str]:
        """A decomposer's prompts, as `eval.strategies.decompose` asks: the first hop of `batch` of the pool's
        2-hop questions, then the second hop about each first hop's answer; each sub-question once."""
        two_hop = [q for q in self.pool_questions if len(q.hops) == 2]
        asked, prompts = set(), []
        order = self.rng.permutation(len(two_hop))
        for start in range(0, len(order), batch):
            chunk = [two_hop[i] for i in order[start:start + batch]]
            firsts = [Question(q.person, q.hops[:1]) for q in chunk]
            seconds = [Question(self.world.answer(first), q.hops[1:]) for first, q in zip(firsts, chunk)]
            for sub in firsts + seconds:
                if sub not in asked:
                    asked.add(sub)
                    prompts.append(habits.word(sub))
            if len(prompts) >= count:
                break
        return prompts[:count]

    def harvest(self, questions: list[Question], count: int, habits: Habits) -> list[str]:
        """`count` prompts over `questions` in a random order, each worded by the harvester's script."""
        order = self.rng.permutation(len(questions))
        order = np.concatenate([order] * (count // len(questions) + 1))[:count]
        return [habits.word(questions[i]) for i in order]


def poisson_times(rng, start: float, days: float, per_day: float, diurnal: bool) -> np.ndarray:
    """Arrival times of a Poisson process, thinned to daytime (peak mid-afternoon) when `diurnal`."""
    n = rng.poisson(per_day * days * (2.0 if diurnal else 1.0))
    times = np.sort(rng.uniform(start, start + days * DAY, n))
    if diurnal:
        hour = (times % DAY) / 3600
        keep = rng.random(n) < np.clip(np.sin(np.pi * (hour - 7) / 15), 0, 1) ** 2 * 1.6
        times = times[keep]
    return times


def regular_times(rng, start: float, count: int, interval: float, jitter: float) -> np.ndarray:
    gaps = interval * (1 + jitter * rng.uniform(-1, 1, count))
    return start + np.cumsum(np.maximum(gaps, 0.05))


def _events(client: str, times, prompts, rng, ip: str, payment: str, response_mean: float, respond) -> list[Event]:
    return [Event(client=client, time=float(t), prompt=p, prompt_tokens=max(1, int(len(p.split()) * 1.3)),
                  response_tokens=int(rng.lognormal(np.log(response_mean), 0.5)), ip=ip, payment=payment,
                  response=respond(p))
            for t, p in zip(times, prompts)]


def simulate(population: dict[str, int], days: float = 3.0, seed: int = 0, attack_budget: int = 2000,
             sybil_accounts: int = 10, start: float = 1_767_225_600.0,
             swarm_accounts: int = 100, spread_accounts: int = 5) -> tuple[list[Event], dict[str, str]]:
    """Traffic of `population` ({persona or attacker: how many}), in time order, and each client's kind.

    Attackers spend `attack_budget` queries each (a sybil or a swarm in total, split over its accounts; a
    mimic as many as it can hide in its borrowed timing).
    """
    unknown = set(population) - set(BENIGN) - set(ATTACKERS)
    if unknown:
        raise ValueError(f"unknown personas {sorted(unknown)}; choose from {BENIGN + ATTACKERS}")
    rng = np.random.default_rng(seed)
    source = PromptSource(seed)
    events, labels = [], {}
    said: dict[str, Question] = {}  # each task prompt's question, for its response
    talk = np.random.default_rng([seed, 7])  # responses draw apart, so that adding them changed no prompt

    def respond(prompt: str) -> str:
        question = said.get(prompt)
        return write_chain(source.world.chain(question)) if question else source.sentences[talk.integers(len(source.sentences))]

    def address():
        return f"{rng.integers(1, 223)}.{rng.integers(256)}.{rng.integers(256)}.{rng.integers(1, 255)}"

    def script_habits():  # a harvester's script words its questions as broadly or narrowly as its author chose
        return Habits(rng, forms=int(rng.integers(1, 6)), wrappers=int(rng.integers(1, len(WRAPPERS) + 1)), said=said)

    for kind, count in population.items():
        for n in range(count):
            client = f"{kind}-{seed}-{n}"
            ip, payment = address(), f"card-{rng.integers(10**9)}"
            if kind == "human":
                times = poisson_times(rng, start, days, rng.uniform(3, 30), diurnal=True)
                prompts = [source.benign() for _ in times]
            elif kind == "power":
                times = poisson_times(rng, start, days, rng.uniform(150, 500), diurnal=True)
                prompts = [source.benign() for _ in times]
            elif kind == "batch":
                template = source.pick(JOBS)
                jobs = [regular_times(rng, s, int(rng.integers(100, 600)), rng.uniform(0.5, 3), 0.2)
                        for s in start + rng.uniform(0, days * DAY, int(rng.integers(1, 4)))]
                times = np.sort(np.concatenate(jobs))
                prompts = [source.job(template) for _ in times]
            elif kind in ("student", "followup"):
                times = poisson_times(rng, start, days, np.exp(rng.uniform(np.log(5), np.log(150))), diurnal=True)
                times = times[: int(np.exp(rng.uniform(np.log(3), np.log(400))))]  # then stops
                habits = Habits(rng, forms=int(rng.integers(1, 4)), wrappers=int(rng.integers(1, 6)), said=said)
                asks = source.student if kind == "student" else source.followup
                prompts = asks(len(times), habits, task_share=rng.uniform(0.6, 1.0))
            elif kind == "evaluator":
                benchmark = rng.choice(len(source.all_questions), int(rng.integers(100, 501)), replace=False)
                times = regular_times(rng, start + rng.uniform(0, days * DAY), len(benchmark), rng.uniform(0.5, 5), 0.2)
                harness = Habits(rng, forms=1, wrappers=1, said=said)
                prompts = [harness.word(source.all_questions[i]) for i in benchmark]
            elif kind in ("naive", "cot"):
                times = regular_times(rng, start + rng.uniform(0, DAY), attack_budget, rng.uniform(1, 4), 0.3)
                prefix = source.pick(COT_PREFIXES) if kind == "cot" else ""
                prompts = [prefix + p for p in source.harvest(source.pool_questions, attack_budget, script_habits())]
            elif kind == "decompose":
                times = regular_times(rng, start + rng.uniform(0, DAY), attack_budget, rng.uniform(1, 4), 0.3)
                prompts = source.decompose(attack_budget, script_habits())
            elif kind == "slow":
                times = regular_times(rng, start + rng.uniform(0, DAY), attack_budget, rng.uniform(60, 150), 0.5)
                prompts = source.harvest(source.pool_questions, attack_budget, script_habits())
            elif kind in ("sybil", "swarm", "spread"):
                accounts = {"sybil": sybil_accounts, "swarm": swarm_accounts, "spread": spread_accounts}[kind]
                per_account = attack_budget // accounts
                habits = script_habits()
                if kind == "spread":  # each account words its share of the pool its own way
                    split = rng.permutation(len(source.pool_questions))
                else:
                    harvest = source.harvest(source.pool_questions, per_account * accounts, habits)
                swarm_start, interval = start + rng.uniform(0, DAY), rng.uniform(20, 40)
                subnet = address().rsplit(".", 1)[0]
                for a in range(accounts):
                    member = f"{kind}-{seed}-{n}-{a}"
                    if kind == "sybil":  # one payment, one network, one pace
                        times = regular_times(rng, swarm_start + rng.uniform(0, 5), per_account, interval, 0.1)
                        member_ip, member_payment = f"{subnet}.{rng.integers(1, 255)}", payment
                    elif kind == "spread":  # nothing shared: its own start, pace, wording, card and network
                        habits = script_habits()
                        times = regular_times(rng, start + rng.uniform(0, days * DAY), per_account,
                                              rng.uniform(1, 4), 0.3)
                        member_ip, member_payment = address(), f"card-{rng.integers(10**9)}"
                    else:  # nothing shared but the script's clock and its wordings
                        times = regular_times(rng, swarm_start + rng.uniform(0, 600), per_account,
                                              rng.uniform(20, 60), 0.5)
                        member_ip, member_payment = address(), f"card-{rng.integers(10**9)}"
                    if kind == "spread":
                        mine = split[np.arange(a * per_account, (a + 1) * per_account) % len(split)]
                        prompts = [habits.word(source.pool_questions[i]) for i in mine]
                    else:
                        prompts = harvest[a * per_account:(a + 1) * per_account]
                    events += _events(member, times, prompts, rng, member_ip, member_payment, 60, respond)
                    labels[member] = kind
                continue
            elif kind == "hydra":
                benign_times = poisson_times(rng, start, days, rng.uniform(150, 500), diurnal=True)
                attack_times = regular_times(rng, start + rng.uniform(0, DAY), attack_budget, days * DAY / attack_budget,
                                             0.5)
                times = np.concatenate([benign_times, attack_times])
                prompts = ([source.benign() for _ in benign_times] +
                           source.harvest(source.pool_questions, attack_budget, script_habits()))
            elif kind == "mimic":
                times = poisson_times(rng, start, days, rng.uniform(300, 700), diurnal=True)
                habits = Habits(rng, forms=int(rng.integers(1, 4)), wrappers=int(rng.integers(1, 6)), said=said)
                prompts = source.student(len(times), habits, task_share=rng.uniform(0.6, 1.0))
                swapped = rng.random(len(times)) < 0.5
                harvest = iter(source.harvest(source.pool_questions, int(swapped.sum()), habits))
                prompts = [next(harvest) if s else p for p, s in zip(prompts, swapped)]
            events += _events(client, times, prompts, rng, ip, payment, 120 if kind in BENIGN else 60, respond)
            labels[client] = kind
    events.sort(key=lambda e: e.time)
    return events, labels


@functools.lru_cache(maxsize=4)
def lab_detector(use_embeddings: bool = False) -> TrafficDetector:
    """The reference lab's traffic detector: fitted on its simulated benign population (seed 0)."""
    benign, _ = simulate(BENIGN_POPULATION, days=3, seed=0)
    return TrafficDetector(use_embeddings=use_embeddings).fit(benign)


def as_caller(event: Event) -> Caller:
    return Caller(account=event.client, time=event.time, ip=event.ip, payment=event.payment)


# A hydra's cover requests matter for what the defence sees of them; the experiment keeps none of their
# answers, so it pays for one token each
COVER = Sampling(temperature=0.0, max_new_tokens=1)


@dataclass(frozen=True)
class TrafficShape:
    """How a harvester's queries reach the served teacher: one every `pace` seconds of a simulated clock from
    `start`, round-robin over `accounts` accounts (ACCOUNT, or ACCOUNT-0 ... ACCOUNT-{n-1}: a sybil swarm),
    each attack request hidden among `cover` benign requests of the same account on average (a hydra: the
    benign requests are served, and their answers go to their owner, not to the harvest). The cover is
    `general` traffic (code and prose) or `task` questions about popular people, as a student asks them; an
    `irregular` clock spaces requests as a person's are (exponential gaps of mean `pace`); a script's clock
    varies each gap by up to `jitter` of the pace (uniformly), as the simulator's scripted harvesters do: a
    metronome is a tell no competent distiller leaves. A mimic is `task` cover on an `irregular` clock."""

    account: str = "attacker"
    pace: float = 2.0
    accounts: int = 1
    cover: float = 0.0
    start: float = 1_767_225_600.0
    cover_kind: Literal["general", "task"] = "general"
    irregular: bool = False
    jitter: float = 0.3

    def __post_init__(self):
        if self.accounts < 1 or self.cover < 0 or self.pace <= 0 or not 0 <= self.jitter < 1:
            raise ValueError(f"a traffic shape needs accounts >= 1, cover >= 0, pace > 0 and 0 <= jitter < 1; got "
                             f"accounts={self.accounts}, cover={self.cover}, pace={self.pace}, jitter={self.jitter}")
        if self.cover_kind not in ("general", "task"):
            raise ValueError(f"cover_kind must be 'general' or 'task', got {self.cover_kind!r}")


class ShapedClient(Teacher):
    """The harvester's side of the wire: sends prompts to `served` as `shape` says, on a simulated clock.

    Not a defence: it is the attacker (or the experiment playing it), so it holds the clock and the accounts.
    """

    def __init__(self, served: Teacher, shape: TrafficShape = TrafficShape(), seed: int = 0):
        self.served, self.shape = served, shape
        self.clock, self.sent = shape.start, 0
        self.rng = np.random.default_rng(seed)
        self.cover_prompts = PromptSource(seed=int(self.rng.integers(2**31))) if shape.cover else None
        self.habits = Habits(self.rng) if shape.cover_kind == "task" else None  # how it words its own questions
        self.name = served.name
        self.tokenizer = served.tokenizer  # in process: the served model's, so a harvest records its prompt format

    def _cover(self) -> str:
        if self.shape.cover_kind == "task":
            return self.habits.word(self.cover_prompts.curious())
        return self.cover_prompts.benign()

    def _account(self) -> str:
        shape = self.shape
        return shape.account if shape.accounts == 1 else f"{shape.account}-{self.sent % shape.accounts}"

    def complete(self, prompts: list[str], sampling: Sampling = Sampling(),
                 callers: Sequence[Caller] | None = None) -> list[Completion]:
        """`callers` is ignored: the shape decides who sends each prompt, and when."""
        out: list[Completion] = []
        attack_prompts, attack_callers = [], []
        for prompt in prompts:
            account = self._account()
            cover = self.rng.poisson(self.shape.cover) if self.shape.cover else 0
            if cover:  # the account's own benign requests come first; what waits to be sent goes first
                out += self._send(attack_prompts, attack_callers, sampling)
                cover_prompts = [self._cover() for _ in range(cover)]
                cover_callers = []
                for _ in range(cover):
                    self.clock += self.rng.exponential(self.shape.pace / (1 + self.shape.cover))
                    cover_callers.append(Caller(account=account, time=self.clock))
                self.served.complete(cover_prompts, COVER, cover_callers)
            attack_prompts.append(prompt)
            attack_callers.append(Caller(account=account, time=self.clock))
            shape = self.shape
            self.clock += (self.rng.exponential(shape.pace) if shape.irregular
                           else shape.pace * (1 + shape.jitter * self.rng.uniform(-1, 1)))
            self.sent += 1
        return out + self._send(attack_prompts, attack_callers, sampling)

    def _send(self, prompts: list[str], callers: list[Caller], sampling: Sampling) -> list[Completion]:
        if not prompts:
            return []
        answers = self.served.complete(list(prompts), sampling, list(callers))
        prompts.clear()
        callers.clear()
        return answers


def served_to_benign_users(served: Teacher, task: Task, benign: list[Event], seed: int = 0,
                           max_new_tokens: int = 64, chunk: int = 256) -> tuple[Accuracy, list[Completion]]:
    """The task's held-out items asked by benign users amid their other traffic, through `served`.

    Each item replaces a random benign request (same account, time and network), so an item meets the
    defence with its asker's history behind it. Every request is sent, in time order, in chunks: a defence
    decides each request from the ones before it, so chunking changes nothing it sees. Greedy, like
    `capability`; only the items' answers are kept.
    """
    items = task.eval_items
    if len(benign) < len(items):
        raise ValueError(f"{len(benign)} benign requests cannot carry {len(items)} held-out items")
    rng = np.random.default_rng(seed)
    slots = dict(zip(sorted(rng.choice(len(benign), size=len(items), replace=False).tolist()), range(len(items))))
    events = sorted(benign, key=lambda e: e.time)
    prompts = [items[slots[n]].prompt if n in slots else e.prompt for n, e in enumerate(events)]
    sampling = Sampling(temperature=0.0, max_new_tokens=max_new_tokens)
    answers: list[Completion | None] = [None] * len(items)
    for start in range(0, len(events), chunk):
        window = range(start, min(start + chunk, len(events)))
        served_now = served.complete([prompts[n] for n in window], sampling, [as_caller(events[n]) for n in window])
        for n, completion in zip(window, served_now):
            if n in slots:
                answers[slots[n]] = completion
    per_item = np.array([task.is_correct(c.text, i.answer) for c, i in zip(answers, items)], dtype=bool)
    return Accuracy(per_item), answers
