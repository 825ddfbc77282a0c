"""The gateway as its provider runs it: each account served under its key's redaction policy (streams
included), the admin API behind its own key, and the audit log's retention. Real HTTP on loopback, the real
`openai` SDK, real SQLite."""

import hashlib
import secrets
import time

import httpx
import openai
import pytest

from conftest import live_server
from eval.reference.world import reference_task
from guard.gateway.app import create_app
from guard.gateway.store import AuditRecord, open_store
from guard.reasoning import split_reasoning
from guard.redaction import Sealer
from guard.teacher import GREEDY

PROMPT = reference_task().eval_items[0].prompt
DAY = 86_400.0


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def served_texts(client: openai.OpenAI) -> dict[str, tuple[str, int]]:
    """What the client sees and is billed, greedy, on each endpoint, whole and streamed (chunks joined)."""
    chat = {"model": "teacher-a", "temperature": 0, "messages": [{"role": "user", "content": PROMPT}]}
    plain = {"model": "teacher-a", "temperature": 0, "prompt": PROMPT}
    usage = {"stream_options": {"include_usage": True}}
    whole_chat = client.chat.completions.create(**chat)
    chat_chunks = list(client.chat.completions.create(**chat, stream=True, **usage))
    whole = client.completions.create(**plain)
    chunks = list(client.completions.create(**plain, stream=True, **usage))
    return {"chat": (whole_chat.choices[0].message.content, whole_chat.usage.completion_tokens),
            "chat stream": ("".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices),
                            chat_chunks[-1].usage.completion_tokens),
            "completions": (whole.choices[0].text, whole.usage.completion_tokens),
            "completions stream": ("".join(ch.text for c in chunks for ch in c.choices),
                                   chunks[-1].usage.completion_tokens)}


def test_each_account_sees_its_own_policy_streams_included_and_hidden_tokens_are_billed(teacher_a, tmp_path):
    teacher = teacher_a.complete([PROMPT], GREEDY)[0]
    reasoning, answer = split_reasoning(teacher.text)
    assert reasoning  # the reference teacher reasons before it answers, so there is something to withhold
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    keys = {"tier-answer-only": store.create_key("tier-answer-only", policy="answer-only"),
            "default": store.create_key("default")}
    app = create_app(lambda: teacher_a, "teacher-a", store=store)  # the gateway's own policy: full
    with live_server(app) as url:
        seen = {account: served_texts(sdk(url, key)) for account, key in keys.items()}
    for endpoint, (text, billed) in seen["tier-answer-only"].items():
        assert split_reasoning(text)[0] is None and text.strip() == f"answer: {answer}", endpoint
        assert billed == len(teacher.token_ids), endpoint  # the hidden reasoning's tokens are billed
    for endpoint, (text, billed) in seen["default"].items():
        assert text == teacher.text and split_reasoning(text)[0] == reasoning, endpoint
        assert billed == len(teacher.token_ids), endpoint
    rows = store.records()
    assert len(rows) == 8
    assert {r.decisions["redaction"] for r in rows if r.account == "tier-answer-only"} == {"answer-only"}
    assert {r.decisions["redaction"] for r in rows if r.account == "default"} == {"full"}
    assert all(reasoning not in r.response for r in rows if r.account == "tier-answer-only")
    assert app.state.policies("answer-only") is app.state.policies("answer-only")  # built once, shared


def test_a_sealed_account_needs_the_gateways_sealing_key(teacher_a, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    sealed = store.create_key("sealed-tier", policy="sealed")
    with pytest.raises(ValueError, match="sealed-tier.*sealing key"):
        create_app(lambda: teacher_a, "teacher-a", store=store)  # refused at start-up, not on a request
    store.revoke(store.resolve(sealed).key_id)
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store)) as url:
        late = store.create_key("sealed-late", policy="sealed")  # by `keys create` while the gateway runs
        reply = httpx.post(f"{url}/v1/completions", headers={"authorization": f"Bearer {late}"}, timeout=30,
                           json={"model": "teacher-a", "prompt": PROMPT, "max_tokens": 8})
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "policy_unavailable"
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, sealer=Sealer.generate())) as url:
        served = sdk(url, late).completions.create(model="teacher-a", prompt=PROMPT, temperature=0)
    assert served.choices[0].model_extra["sealed_reasoning"].startswith(Sealer.PREFIX)


def test_admin_api_creates_lists_and_revokes_keys_and_reads_and_purges_the_audit_log(teacher_a, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    client_key = store.create_key("client")
    admin_key = secrets.token_urlsafe(32)
    ask = {"model": "teacher-a", "prompt": PROMPT, "max_tokens": 8}
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, admin_key=admin_key)) as url:
        def admin(method, path, key=admin_key, **kwargs):
            return httpx.request(method, f"{url}/admin/{path}", headers={"authorization": f"Bearer {key}"},
                                 timeout=30, **kwargs)

        assert httpx.get(f"{url}/admin/keys").status_code == 401
        for wrong in (admin_key + "x", client_key):  # a client's key opens no admin route
            refused = admin("GET", "keys", key=wrong)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_admin_key"
        with pytest.raises(openai.AuthenticationError):  # nor does the admin key buy completions
            sdk(url, admin_key).completions.create(**ask)

        created = admin("POST", "keys", json={"account": "new", "rpm": 100, "policy": "answer-only"})
        assert created.status_code == 201
        new = created.json()
        assert new["key"].startswith("dg-") and new["account"] == "new" and new["policy"] == "answer-only"
        assert admin("POST", "keys", json={"account": "x", "policy": "nonsense"}).status_code == 400
        sdk(url, new["key"]).completions.create(**ask)

        listed = admin("GET", "keys")
        assert {k["account"] for k in listed.json()} == {"client", "new"}
        for secret in (new["key"], client_key):
            assert secret not in listed.text and hashlib.sha256(secret.encode()).hexdigest()[:16] not in listed.text

        page = admin("GET", "audit", params={"limit": 1}).json()
        assert [r["account"] for r in page["data"]] == ["new"] and page["data"][0]["completion_tokens"] > 0
        assert page["next_seq"] == page["data"][0]["seq"]
        assert admin("GET", "audit", params={"after_seq": page["next_seq"]}).json() == {
            "data": [], "next_seq": page["next_seq"]}
        assert admin("GET", "audit", params={"since": page["data"][0]["time"] + 1}).json()["data"] == []

        assert admin("DELETE", f"keys/{new['id']}").json()["revoked"] is True
        with pytest.raises(openai.AuthenticationError):
            sdk(url, new["key"]).completions.create(**ask)
        assert admin("DELETE", f"keys/{new['id']}").status_code == 404

        store.log(AuditRecord("req-old", "client", time.time() - 40 * DAY, "old prompt"))
        assert admin("POST", "audit/purge", json={"older_than_days": 30}).json() == {"deleted": 1}
    assert [r.account for r in store.records()] == ["new"]


def test_without_an_admin_key_the_admin_api_does_not_exist(teacher_a, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("client")
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store)) as url:
        for auth in ({}, {"authorization": "Bearer anything"}, {"authorization": f"Bearer {key}"}):
            reply = httpx.post(f"{url}/admin/keys", json={"account": "x"}, headers=auth, timeout=30)
            assert reply.status_code == 404 and reply.json()["error"]["code"] == "admin_disabled"
    assert [a.name for a in store.list_keys()] == ["client"]
    with pytest.raises(ValueError, match="store"):
        create_app(lambda: teacher_a, "teacher-a", admin_key=secrets.token_urlsafe(32))
    with pytest.raises(ValueError, match="at least"):
        create_app(lambda: teacher_a, "teacher-a", store=store, admin_key="short")


def test_retention_purges_old_rows_at_start_up_and_then_periodically(teacher_a, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    now = time.time()
    store.log(*(AuditRecord(f"req-{age}", "client", now - age * DAY, "p") for age in (30, 8, 6, 1)))
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, retention=7 * DAY)):
        assert sorted(r.request_id for r in store.records()) == ["req-1", "req-6"]  # before any request
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, retention=0.5)):
        store.log(AuditRecord("req-now", "client", time.time(), "p"))  # after start-up's purge
        deadline = time.monotonic() + 20
        while store.records() and time.monotonic() < deadline:  # the row ages past 0.5 s while served
            time.sleep(0.1)
        assert store.records() == []
