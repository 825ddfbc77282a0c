"""Faults a real deployment meets at the gateway's edge: keys revoked while requests race, conversations that
hide their question outside the last user turn, chat templates that refuse a conversation, sealed reasoning
handed back. Real HTTP on loopback, the real `openai` SDK, real SQLite, the lab's real teacher."""

import threading
import time

import httpx
import openai
import pytest

from conftest import live_server, raising_template_teacher
from eval.reference.world import reference_task
from guard.defenses import DefenseParts, build_defense
from guard.redaction import Redact, Sealed, Sealer
from guard.server import KeyCache, create_app
from guard.store import Account, open_store
from guard.teacher import Teacher

PROMPT = "question: what does the friend of Bobuk do for a living?\n"


def test_a_key_revoked_while_its_lookup_is_in_flight_does_not_come_back():
    """The store answered a lookup; the key is revoked here (admin API) before that answer is cached: the answer,
    older than the revocation, is dropped, so the revoked key is refused at once rather than for `ttl` more."""
    cache = KeyCache(ttl=60)
    account = Account("acme", key_id="k1")
    asked = time.monotonic()  # the store is asked ...
    cache.forget("k1")  # ... the key is revoked meanwhile ...
    cache.put("sk-secret", account, asked)  # ... and the store's older answer arrives
    assert cache.get("sk-secret") is None
    cache.put("sk-secret", account, time.monotonic())  # a lookup made after the revocation is cached as usual
    assert cache.get("sk-secret") == account


def test_revoking_while_other_threads_cache_keys_never_raises():
    """Revocations iterate the cache while request threads add to it: no error (a 500 for the revoker) and no
    lost key."""
    cache, errors, stop = KeyCache(ttl=60), [], threading.Event()

    def cache_keys(thread: int):
        n = 0
        while not stop.is_set():
            cache.put(f"key-{thread}-{n}", Account(f"a{thread}", key_id=f"id-{thread}-{n}"), time.monotonic())
            n += 1

    workers = [threading.Thread(target=cache_keys, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    try:
        for n in range(100):
            try:
                cache.forget(f"id-0-{n}")
            except RuntimeError as e:  # "dictionary changed size during iteration"
                errors.append(e)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert errors == []


def test_a_harvest_asked_in_system_turns_behind_an_innocuous_last_message_is_monitored_and_logged(
        teacher_a, benign_detector, tmp_path):
    """The model reads the whole conversation, so the monitor and the audit log must too: a harvester who puts
    each question in a system turn (and an earlier user turn) behind "thanks, go on" is judged on its questions,
    blocked as a harvester, and its rows hold the questions it asked."""
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("hider")
    served = build_defense("monitor", teacher_a, DefenseParts(detector=benign_detector))
    questions = [i.prompt for i in reference_task().query_pool[:120]]
    with live_server(create_app(lambda: served, "teacher-a", store=store)) as url:
        statuses = [httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                               json={"model": "teacher-a", "max_tokens": 24, "messages": [
                                   {"role": "system", "content": question},
                                   {"role": "user", "content": "thanks, go on"}]}).status_code
                    for question in questions]
    assert statuses[-20:] == [403] * 20
    rows = store.records()
    assert len(rows) == len(questions)
    assert all(question in row.prompt for row, question in zip(rows, questions))
    assert all(row.decisions["monitor"].startswith(("block: p=", "throttle: p=")) for row in rows[-20:])


def test_a_conversation_the_chat_template_refuses_is_a_400_naming_the_reason(teacher_a):
    teacher = raising_template_teacher(teacher_a)
    with live_server(create_app(lambda: teacher, "teacher-a")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for turns, reason in [([{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}],
                               "System role not supported"),
                              ([{"role": "user", "content": PROMPT}, {"role": "user", "content": PROMPT}],
                               "roles must alternate")]:
            with pytest.raises(openai.BadRequestError, match=reason):
                client.chat.completions.create(model="teacher-a", messages=turns, max_tokens=4)
        served = client.chat.completions.create(model="teacher-a", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=4)
        assert served.choices[0].finish_reason in ("stop", "length")


class Reads(Teacher):
    """The lab's teacher, keeping every prompt it was asked (what the model read)."""

    def __init__(self, teacher: Teacher):
        self.teacher, self.read = teacher, []
        self.tokenizer, self.name = teacher.tokenizer, teacher.name

    @property
    def context_length(self):
        return self.teacher.context_length

    def complete(self, prompts, sampling, callers=None):
        self.read.extend(prompts)
        return self.teacher.complete(prompts, sampling, callers)


def test_sealed_reasoning_handed_back_reaches_the_model_and_only_in_its_own_conversation(teacher_a):
    sealer = Sealer.generate()
    reads = Reads(teacher_a)
    app = create_app(lambda: Redact(reads, Sealed(sealer)), "teacher-a", sealer=sealer)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        first = client.chat.completions.create(model="teacher-a", temperature=0,
                                               messages=[{"role": "user", "content": PROMPT}]).choices[0].message
        blob = first.model_extra["sealed_reasoning"]
        assert "Peors" not in first.content

        def follow_up(opening: str):
            return client.chat.completions.create(model="teacher-a", temperature=0, max_tokens=8, messages=[
                {"role": "user", "content": opening},
                {"role": "assistant", "content": first.content, "sealed_reasoning": blob},
                {"role": "user", "content": "question: who is the boss of Bobuk?\n"}])

        follow_up(PROMPT)
        [assistant_turn] = [m for m in reads.read[-1].messages if m["role"] == "assistant"]
        assert "Peors" in assistant_turn["content"] and assistant_turn["content"].endswith(first.content)
        with pytest.raises(openai.BadRequestError, match="different conversation"):
            follow_up("question: where does Kalon live?\n")  # the blob moved to a conversation it did not answer
