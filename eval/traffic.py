"""Simulated API traffic, on a simulated clock: benign personas and distillation attackers for tests,
benchmarks and threshold calibration; the attacker's traffic shape through a served teacher; and the
replay of benign traffic through a deployment, to measure what a defence that remembers callers costs
benign users.

Benign personas:
- `human`: a few requests a day in daytime sessions (Poisson arrivals under a diurnal rate);
- `power`: a heavy interactive user, same shape, many more requests;
- `batch`: a legitimate high-volume customer running one narrow templated job in regular bursts,
  the hard case for false positives.

Attackers (prompts from the reference task's attacker pool):
- `naive`: bulk harvest at a steady scripted rate;
- `cot`: the same, each prompt asking for every intermediate step;
- `slow`: under a per-key rate limit, jittered, around the clock;
- `sybil`: K accounts that each stay under every per-account threshold, sharing a template, a start time
  and a payment fingerprint;
- `hydra`: attack prompts mixed into a legitimate power user's account;
- `decompose`: only 1-hop sub-questions, from which the attacker writes the 2-hop chains itself.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from detectors.detector import TrafficDetector
from detectors.events import Event
from eval.metrics import Accuracy
from eval.prose import human_prose
from eval.reference.world import Question, format_prompt, reference_task
from eval.task import Task
from guard.teacher import Caller, Completion, Sampling, Teacher

DAY = 86_400.0
BENIGN = ("human", "power", "batch")
ATTACKERS = ("naive", "cot", "slow", "sybil", "hydra", "decompose")
# What detectors are fitted on by default: half of it (300 clients) is held out to calibrate, enough to
# resolve a 1% false-positive rate with a threshold above the third-highest held-out score.
BENIGN_POPULATION = {"human": 360, "power": 120, "batch": 120}

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


class PromptSource:
    """Benign prompts from templates filled with real prose, and the reference task's attacker prompts."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        paragraphs = human_prose(max_chars=400_000)
        self.paragraphs = [p[:400] for p in paragraphs]
        self.sentences = [s.strip() + "." for p in paragraphs for s in p.split(". ") if 30 < len(s) < 200]
        self.pool = [i.prompt for i in reference_task().query_pool]
        people = sorted({i.prompt.rstrip("?\n").split()[-1] for i in reference_task().query_pool})
        self.one_hop = [format_prompt(Question(p, (h,)).text) for p in people
                        for h in ("boss", "friend", "mentor", "city", "job", "pet")]

    def pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def benign(self) -> str:
        if self.rng.random() < 0.5:
            return self.pick(ASKS).format(p=self.pick(self.paragraphs), s=self.pick(self.sentences))
        return self.pick(QUESTIONS).format(v=self.pick(VERBS), t=self.pick(TOPICS))

    def job(self, template: str) -> str:
        return template.format(s=self.pick(self.sentences))


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


def _events(client: str, times, prompts, rng, ip: str, payment: str, response_mean: float) -> list[Event]:
    return [Event(client=client, time=float(t), prompt=p, prompt_tokens=max(1, int(len(p.split()) * 1.3)),
                  response_tokens=int(rng.lognormal(np.log(response_mean), 0.5)), ip=ip, payment=payment)
            for t, p in zip(times, prompts)]


def simulate(population: dict[str, int], days: float = 3.0, seed: int = 0, attack_budget: int = 2000,
             sybil_accounts: int = 10, start: float = 1_767_225_600.0) -> tuple[list[Event], dict[str, str]]:
    """Traffic of `population` ({persona or attacker: how many}), in time order, and each client's kind.

    Attackers spend `attack_budget` queries each (a sybil swarm in total, split over its accounts).
    """
    unknown = set(population) - set(BENIGN) - set(ATTACKERS)
    if unknown:
        raise ValueError(f"unknown personas {sorted(unknown)}; choose from {BENIGN + ATTACKERS}")
    rng = np.random.default_rng(seed)
    source = PromptSource(seed)
    events, labels = [], {}

    def address():
        return f"{rng.integers(1, 223)}.{rng.integers(256)}.{rng.integers(256)}.{rng.integers(1, 255)}"

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
            elif kind in ("naive", "cot", "decompose"):
                times = regular_times(rng, start + rng.uniform(0, DAY), attack_budget, rng.uniform(1, 4), 0.3)
                pool = source.one_hop if kind == "decompose" else source.pool
                prefix = source.pick(COT_PREFIXES) if kind == "cot" else ""
                prompts = [prefix + pool[i] for i in rng.permutation(len(pool))[:attack_budget] % len(pool)]
                prompts += [prefix + source.pick(pool) for _ in range(attack_budget - len(prompts))]
            elif kind == "slow":
                times = regular_times(rng, start + rng.uniform(0, DAY), attack_budget, rng.uniform(60, 150), 0.5)
                prompts = [source.pick(source.pool) for _ in times]
            elif kind == "sybil":
                per_account = attack_budget // sybil_accounts
                swarm_start, interval = start + rng.uniform(0, DAY), rng.uniform(20, 40)
                shared_payment, subnet = payment, address().rsplit(".", 1)[0]
                for a in range(sybil_accounts):
                    member = f"sybil-{seed}-{n}-{a}"
                    times = regular_times(rng, swarm_start + rng.uniform(0, 5), per_account, interval, 0.1)
                    prompts = [source.pick(source.pool) for _ in times]
                    events += _events(member, times, prompts, rng, f"{subnet}.{rng.integers(1, 255)}",
                                      shared_payment, 60)
                    labels[member] = kind
                continue
            elif kind == "hydra":
                benign_times = poisson_times(rng, start, days, rng.uniform(150, 500), diurnal=True)
                attack_times = regular_times(rng, start + rng.uniform(0, DAY), attack_budget, days * DAY / attack_budget,
                                             0.5)
                times = np.concatenate([benign_times, attack_times])
                prompts = [source.benign() for _ in benign_times] + [source.pick(source.pool) for _ in attack_times]
            events += _events(client, times, prompts, rng, ip, payment, 120 if kind in BENIGN else 60)
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
    benign requests are served, and their answers go to their owner, not to the harvest)."""

    account: str = "attacker"
    pace: float = 2.0
    accounts: int = 1
    cover: float = 0.0
    start: float = 1_767_225_600.0

    def __post_init__(self):
        if self.accounts < 1 or self.cover < 0 or self.pace <= 0:
            raise ValueError(f"a traffic shape needs accounts >= 1, cover >= 0 and pace > 0; got accounts="
                             f"{self.accounts}, cover={self.cover}, pace={self.pace}")


class ShapedClient(Teacher):
    """The harvester's side of the wire: sends prompts to `served` as `shape` says, on a simulated clock.

    Not a defence: it is the attacker (or the experiment playing it), so it holds the clock and the accounts.
    """

    def __init__(self, served: Teacher, shape: TrafficShape = TrafficShape(), seed: int = 0):
        self.served, self.shape = served, shape
        self.clock, self.sent = shape.start, 0
        self.rng = np.random.default_rng(seed)
        self.cover_prompts = PromptSource(seed=int(self.rng.integers(2**31))) if shape.cover else None
        self.name = served.name

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
                cover_prompts = [self.cover_prompts.benign() for _ in range(cover)]
                cover_callers = []
                for _ in range(cover):
                    self.clock += self.rng.exponential(self.shape.pace / (1 + self.shape.cover))
                    cover_callers.append(Caller(account=account, time=self.clock))
                self.served.complete(cover_prompts, COVER, cover_callers)
            attack_prompts.append(prompt)
            attack_callers.append(Caller(account=account, time=self.clock))
            self.clock += self.shape.pace
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
