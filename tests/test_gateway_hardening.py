"""Faults a real deployment meets at the gateway's edge: keys revoked while requests race, conversations that
hide their question outside the last user turn, chat templates that refuse a conversation, sealed reasoning
handed back. Real HTTP on loopback, the real `openai` SDK, real SQLite, the lab's real teacher."""

import threading
import time

import httpx
import openai
import pytest

from conftest import free_port, live_server, raising_template_teacher
from eval.reference.world import reference_task
from guard.defenses import DefenseParts, build_defense
from guard.gateway.app import create_app
from guard.gateway.auth import KeyCache
from guard.gateway.store import Account, open_store
from guard.redaction import Redact, Sealed, Sealer, Summary, outline
from guard.teacher import GREEDY, Completion, Defense, Teacher

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


def _one_request_each(url: str, key: str, headers: list[dict]) -> None:
    for extra in headers:
        reply = httpx.post(url + "/v1/completions", timeout=30, headers={"authorization": f"Bearer {key}", **extra},
                           json={"model": "teacher-a", "prompt": PROMPT, "max_tokens": 2})
        assert reply.status_code == 200, reply.text


def test_forwarded_addresses_and_end_users_are_taken_from_trusted_proxies_only(teacher_a, tmp_path):
    """Behind a trusted balancer (here: loopback) each request is its forwarded client's, and an upstream
    gateway's end-user header splits one key into its users for the monitor and the log. From an address that is
    not trusted, both headers are ignored: a client cannot choose its address or pose as another user."""
    forwarded = [{"x-forwarded-for": "203.0.113.7", "x-end-user": "alice"},
                 {"x-forwarded-for": "198.51.100.9", "x-end-user": "bob"}]
    seen = {}
    for trusted in (["127.0.0.1"], ["10.0.0.0/8"], None):
        store = open_store(f"sqlite:///{tmp_path / f'{trusted}.db'}")
        key = store.create_key("acme")
        app = create_app(lambda: teacher_a, "teacher-a", store=store, trusted_proxies=trusted,
                         end_user_header="X-End-User")
        with live_server(app) as url:
            _one_request_each(url, key, forwarded)
        seen[str(trusted)] = [(row.ip, row.account) for row in store.records()]
    assert seen["['127.0.0.1']"] == [("203.0.113.7", "acme/alice"), ("198.51.100.9", "acme/bob")]
    assert seen["['10.0.0.0/8']"] == seen["None"] == [("127.0.0.1", "acme")] * 2


def test_stop_ends_the_text_before_it_and_fields_the_server_does_not_apply_are_a_400_naming_them(teacher_a):
    with live_server(create_app(lambda: teacher_a, "teacher-a")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        whole = client.completions.create(model="teacher-a", prompt=PROMPT, temperature=0, max_tokens=32).choices[0]
        assert "Peors" in whole.text
        stopped = client.completions.create(model="teacher-a", prompt=PROMPT, temperature=0, max_tokens=32,
                                            stop=["Peors", "never written"]).choices[0]
        assert stopped.text == whole.text[:whole.text.index("Peors")] and stopped.finish_reason == "stop"
        chat = client.chat.completions.create(model="teacher-a", temperature=0, max_tokens=32, stop="Peors",
                                              messages=[{"role": "user", "content": PROMPT}]).choices[0]
        assert "Peors" not in chat.message.content and chat.finish_reason == "stop"
        for field, value in [("frequency_penalty", 0.5), ("logit_bias", {"50256": -100})]:
            with pytest.raises(openai.BadRequestError, match=f"{field}: this server does not take this field"):
                client.completions.create(model="teacher-a", prompt=PROMPT, max_tokens=4, **{field: value})
        assert client.completions.create(model="teacher-a", prompt=PROMPT, max_tokens=4, user="u-1").choices


def test_the_api_map_is_private_by_default_and_metrics_sit_behind_the_admin_key(teacher_a, tmp_path):
    admin = "admin-key-0123456789abcdef0123456789abcdef"
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, admin_key=admin)) as url:
        assert [httpx.get(url + path).status_code for path in ("/docs", "/redoc", "/openapi.json")] == [404] * 3
        assert httpx.get(url + "/metrics").status_code == 401
        metrics = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {admin}"})
        assert metrics.status_code == 200 and "distill_guard_requests" in metrics.text
        for beyond in ("after_seq=18446744073709551616", "since=nan", "since=inf"):  # found by the fuzz run: a 500
            page = httpx.get(url + "/admin/audit?" + beyond, headers={"authorization": f"Bearer {admin}"})
            assert page.status_code == 400, (beyond, page.text)
    with live_server(create_app(lambda: teacher_a, "teacher-a", public_docs=True,
                                metrics_on_api_port=False)) as url:
        assert httpx.get(url + "/openapi.json").json()["paths"]["/v1/completions"]
        assert httpx.get(url + "/metrics").status_code == 404


class RefusesSome(Defense):
    """A rule in place of the monitor's verdict: prompts holding "refuse me" are refused, as a blocked account's
    are, and the rest are the teacher's."""

    def complete(self, prompts, sampling=GREEDY, callers=None):
        answers = self.teacher.complete(prompts, sampling, callers)
        return [Completion(text="", finish_reason="refused") if "refuse me" in p else a
                for p, a in zip(prompts, answers)]


def test_a_batch_with_a_refused_prompt_logs_every_prompt_it_was_sent(teacher_a, tmp_path):
    """A completions request whose second prompt is refused is a 403, but the audit log still holds all three
    prompts, the third too: what the account asked is the provider's to see, refusal or not."""
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("acme")
    prompts = [PROMPT, "refuse me: " + PROMPT, "question: where does Kalon live?\n"]
    with live_server(create_app(lambda: RefusesSome(teacher_a), "teacher-a", store=store)) as url:
        for stream in (False, True):
            reply = httpx.post(url + "/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                               json={"model": "teacher-a", "prompt": prompts, "max_tokens": 4, "stream": stream})
            assert reply.status_code == 403
    rows = store.records()
    assert [row.prompt for row in rows] == prompts * 2
    assert [row.status for row in rows] == [200, 403, 200] * 2


def test_a_stream_is_redacted_once_and_logged_as_sent(teacher_a, tmp_path):
    """A summary costs a summariser call (a model's, in production): a streamed answer is summarised once, and
    the audit row holds exactly the text the client received."""
    calls = []

    def counted(prompts, reasonings):
        calls.append(len(prompts))
        return outline(prompts, reasonings)

    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("acme")
    app = create_app(lambda: teacher_a, "teacher-a", store=store, policy=Summary(counted), summarize=counted)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        chunks = client.chat.completions.create(model="teacher-a", temperature=0, stream=True,
                                                messages=[{"role": "user", "content": PROMPT}])
        received = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert calls == [1]
    [row] = store.records()
    assert row.response == received and "Peors" not in received


def test_the_serve_commands_proxy_docs_and_metrics_options_reach_the_gateway(tmp_path):
    """`distill-guard gateway` as an operator starts it, with --forwarded-allow-ips, --end-user-header and
    --metrics-port: the forwarded client and the end user reach the audit log, the metrics are on their own
    port and not on the API's, and the API's map is not served."""
    from test_gateway_durability import gateway

    store_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    key = open_store(store_url).create_key("acme")
    metrics_port = free_port()
    with gateway(store_url, tmp_path / "gateway.log", "--forwarded-allow-ips", "127.0.0.0/8", "--end-user-header",
                 "x-end-user", "--metrics-port", str(metrics_port)) as (_, url):
        _one_request_each(url, key, [{"x-forwarded-for": "203.0.113.7", "x-end-user": "alice"}])
        assert [httpx.get(url + path).status_code for path in ("/docs", "/openapi.json", "/metrics")] == [404] * 3
        assert "distill_guard_requests" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    [row] = open_store(store_url).records()
    assert (row.ip, row.account) == ("203.0.113.7", "acme/alice")
