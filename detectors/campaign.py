"""Campaigns: one harvest spread over accounts that each ask no more than an evaluation customer does, with
nothing shared between them (payment, network, start, pace, wording). Alone, each is an evaluation customer;
together they cover the task's space the way one harvester does: without asking anything twice.

Each account's questions are keyed by content: what was asked about (the prompt's key, its rarest word) and
what the answer named (its words that at most a tenth of benign prompts use). Two accounts asking one question
in their own words share that key; two different questions about one person do not. Independent accounts
asking in the same space ask some of the same questions, at a rate the space's popularity sets: accounts a
and b are expected to share E_ab = n_a n_b sum_q pi_q^2 questions (pi: how often each question is asked,
over every candidate account). The parts of one harvest share none.

    campaigns = find_campaigns(questions)      # account -> its question keys (`QuestionLog`)

A campaign is a set of accounts, no two sharing more than a third of the questions independent askers would,
found greedily: the account with the most evidence against the accounts it is compatible with starts it, and
the compatible account that adds the most evidence, counting what it leaves room for, joins it, as long as
one does. Its statistic is the
evidence, sum over member pairs of -log P(sharing so few | independent, E_ab) (E_ab when they share none). Its
p-value is permutation-based and one-sided: each account's questions redrawn from the pooled popularity (the
null of independent askers; with replacement), the same search run on each redraw, p = (1 + #{redraws at least as extreme}) /
(1 + redraws). Members are ranked by their own evidence, sum over the other members of E_ab, and named with
their own p-value, exp(-evidence): the chance that an independent account of their volume shared so little.

Only accounts asking in the task's rare tail are candidates (their keys' surprisal at least the benign
population's `rare_surprisal`, as `detectors.cluster` reads it): people asking about popular things share
questions all the time, and are not what a harvest looks like.
"""

from __future__ import annotations

import zlib
from array import array

import numpy as np
from scipy.sparse import csr_matrix
from scipy.stats import poisson

from detectors.events import Event
from detectors.features import Popularity

QUESTIONS_KEPT = 512  # question keys kept per account (the first ones, 4 KB): an account past that is judged alone
MIN_QUESTIONS = 20  # fewer answered questions are no evidence of anything
# what an answer named, for telling questions apart: its words that at most a tenth of benign prompts use
# (a popular person, named in two answers' chains, tells them apart too), whatever the prompt's wording
ANSWER_SHARE = 0.1


class QuestionLog:
    """Per account, the keys of the questions it asked and was answered, and its keys' mean surprisal; at most
    `QUESTIONS_KEPT` per account (a few KB), for the accounts asking in the task's space only."""

    def __init__(self, popularity: Popularity):
        self.popularity = popularity
        self.questions: dict[str, array] = {}
        self.subjects: dict[str, array] = {}  # the keys alone: what the questions were about
        self.surprisal: dict[str, list[float]] = {}  # (sum, count) of the keys' surprisals

    def add(self, event: Event) -> None:
        if event.response is None:
            return
        key, surprisal = self.popularity.key(event.prompt)
        if not key or surprisal is None:  # off the popularity curve: not a question in the task's space
            return
        mine = self.questions.setdefault(event.client, array("I"))
        if len(mine) < QUESTIONS_KEPT:
            entities = " ".join(sorted(self.popularity.rare_words(event.response, ANSWER_SHARE)))
            mine.append(zlib.crc32(f"{key}|{entities}".encode()))
            self.subjects.setdefault(event.client, array("I")).append(zlib.crc32(key.encode()))
            total = self.surprisal.setdefault(event.client, [0.0, 0])
            total[0] += surprisal
            total[1] += 1

    def forget(self, client: str) -> None:
        for kept in (self.questions, self.subjects, self.surprisal):
            kept.pop(client, None)

    def candidates(self, rare_surprisal: float, min_questions: int = MIN_QUESTIONS,
                   shared_subjects: float = 0.5) -> dict[str, np.ndarray]:
        """The accounts asking at least `min_questions` questions about what benign users rarely ask about, in
        one space: at least `shared_subjects` of the things each asks about are asked about by another of them
        (a batch job's pasted text is about things nobody else asks about: it shares no question with anyone,
        as the parts of a harvest do, without being one)."""
        rare = [c for c, mine in self.questions.items()
                if len(mine) >= min_questions and self.surprisal[c][0] / self.surprisal[c][1] >= rare_surprisal]
        subjects = {c: np.unique(np.asarray(self.subjects[c])) for c in rare}
        everyone, counts = np.unique(np.concatenate(list(subjects.values()) or [np.zeros(0, int)]), return_counts=True)
        shared = set(everyone[counts > 1].tolist())
        return {c: np.unique(np.asarray(self.questions[c])) for c in rare
                if np.mean([s in shared for s in subjects[c].tolist()]) >= shared_subjects}


def _incidence(questions: list[np.ndarray]) -> tuple[csr_matrix, np.ndarray]:
    """Accounts x distinct questions (0/1), and how many accounts asked each question."""
    vocabulary, cols = np.unique(np.concatenate(questions), return_inverse=True)
    rows = np.repeat(np.arange(len(questions)), [len(q) for q in questions])
    matrix = csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=(len(questions), len(vocabulary)))
    return matrix, np.asarray(matrix.sum(axis=0)).ravel()


def _search(matrix: csr_matrix, asked: np.ndarray) -> tuple[list[int], float, np.ndarray]:
    """The greedy campaign in one incidence matrix: its members (row numbers), its evidence, and each
    member's own evidence."""
    sizes = np.asarray(matrix.sum(axis=1)).ravel().astype(float)
    pi = asked / asked.sum()
    expected = np.outer(sizes, sizes) * float((pi ** 2).sum())  # E_ab under independent askers
    shared = (matrix @ matrix.T).toarray()
    # a pair sharing at most a third of what independent askers would: -log P(so few | independent askers).
    # Two answers can name the same things by chance (a person who is two others' friend), so a few shared
    # are allowed; independent askers share about what is expected, far more than a third
    disjoint = shared <= np.floor(expected / 3)
    np.fill_diagonal(disjoint, False)
    weight = np.zeros_like(expected)
    weight[disjoint] = -poisson.logcdf(shared[disjoint], expected[disjoint])
    members = [int(np.argmax(weight.sum(axis=1)))]
    open_ = disjoint[members[0]].copy()
    open_[members[0]] = False
    gain = weight[members[0]].copy()
    # what joining adds now, and what it leaves room for: an account that shares nothing with one member but
    # much with the others would close the campaign for the sake of one pair
    room = weight[:, open_].sum(axis=1)
    while open_.any():
        best = int(np.argmax(np.where(open_, gain + room, -1.0)))
        members.append(best)
        still = open_ & disjoint[best]
        still[best] = False
        room -= weight[:, open_ & ~still].sum(axis=1)
        open_ = still
        gain += weight[best]
    own = weight[np.ix_(members, members)].sum(axis=1)
    return members, float(own.sum() / 2), own


def find_campaigns(questions: dict[str, np.ndarray], permutations: int = 99, alpha: float = 0.01,
                   member_alpha: float = 0.01, seed: int = 0, max_campaigns: int = 3) -> list[dict]:
    """Campaigns among the candidate accounts `questions` (each account's distinct question keys): each with
    its evidence, its permutation p-value, whether it alarms (p <= alpha), and its members ranked by their
    own evidence, each with its p-value (named: at most `member_alpha` over the number of candidates, as any
    of them might have joined by chance). After a campaign is found its members are set aside and the search
    runs again, up to `max_campaigns` times, while campaigns alarm."""
    if (1 + permutations) * alpha < 1:
        raise ValueError(f"{permutations} permutations cannot give a p-value of {alpha} or less; use at least "
                         f"{int(np.ceil(1 / alpha)) - 1}")
    rng = np.random.default_rng(seed)
    clients = sorted(questions)
    member_alpha /= max(len(clients), 1)
    found = []
    while len(clients) >= 2 and len(found) < max_campaigns:
        rows = [questions[c] for c in clients]
        matrix, asked = _incidence(rows)
        members, evidence, own = _search(matrix, asked)
        sizes = np.array([len(r) for r in rows])
        cumulative, owner = np.cumsum(asked), np.repeat(np.arange(len(rows)), sizes)
        null = []
        for _ in range(permutations):  # independent askers of the same volumes, in the same space
            # each account's questions drawn from the pooled popularity (with replacement: a repeat is one
            # question, as an account asking one twice is)
            drawn = np.searchsorted(cumulative, rng.random(len(owner)) * cumulative[-1], side="right")
            redrawn = csr_matrix((np.ones(len(owner), dtype=np.int32), (owner, drawn)), shape=matrix.shape)
            redrawn.sum_duplicates()
            redrawn.data[:] = 1
            null.append(_search(redrawn, np.asarray(redrawn.sum(axis=0)).ravel())[1])
        p = (1 + sum(t >= evidence for t in null)) / (1 + permutations)
        ranked = sorted(zip(members, own), key=lambda m: -m[1])
        found.append({"evidence": evidence, "p_value": p, "alarm": p <= alpha, "null_evidence_max": max(null),
                      "members": [{"client": clients[m], "evidence": float(e), "p_value": float(np.exp(-e)),
                                   "named": bool(p <= alpha and np.exp(-e) <= member_alpha),
                                   "questions": int(sizes[m])} for m, e in ranked]})
        if p > alpha:
            break
        gone = {clients[m] for m in members}
        clients = [c for c in clients if c not in gone]
    return found
