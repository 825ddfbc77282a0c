"""The server keeps the caller: each API key resolves to its account, the account reaches every defence, and
every request lands in the audit log before its response is sent. Real HTTP, the real `openai` SDK, real
SQLite."""

import base64
import json

import openai
import pytest
from typer.testing import CliRunner

from conftest import live_server
from eval.reference.world import reference_task
from guard.cli import app as cli
from guard.defenses import DefenseParts, build_defense
from guard.gateway.app import create_app
from guard.gateway.store import open_store
from watermark.detect import WatermarkDetector, name_client
from watermark.kgw import GreenList, WatermarkConfig, WatermarkKey

MASTER = b"test-master-secret-0123456789abcdef"
CONFIG = WatermarkConfig(delta=4.0)


@pytest.mark.slow
def test_each_key_is_served_under_its_own_accounts_watermark_and_logged(teacher_a, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    keys = {account: store.create_key(account) for account in ("alice", "bob", "carol")}
    carol = next(a for a in store.list_keys() if a.name == "carol")
    store.revoke(carol.key_id)
    served = build_defense("watermark", teacher_a, DefenseParts(watermark_master=MASTER, watermark_config=CONFIG))
    prompts = [i.prompt for i in reference_task().query_pool[:80]]
    texts = {}
    with live_server(create_app(lambda: served, "teacher-a", store=store)) as url:
        for account in ("alice", "bob"):
            client = openai.OpenAI(base_url=url + "/v1", api_key=keys[account], max_retries=0)
            texts[account] = [client.completions.create(model="teacher-a", prompt=p, temperature=1.0, seed=n,
                                                        max_tokens=48).choices[0].text
                              for n, p in enumerate(prompts)]
        revoked = openai.OpenAI(base_url=url + "/v1", api_key=keys["carol"], max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            revoked.completions.create(model="teacher-a", prompt=prompts[0], max_tokens=4)
        wrong = openai.OpenAI(base_url=url + "/v1", api_key=keys["alice"] + "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="teacher-a", prompt=prompts[0], max_tokens=4)
    tokenizer = teacher_a.tokenizer
    for account, answers in texts.items():
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        sequences = [ids + tokenizer(t, add_special_tokens=False)["input_ids"] for ids, t in zip(prompt_ids, answers)]
        detections = {who: WatermarkDetector(GreenList(WatermarkKey.for_client(MASTER, who), len(tokenizer), CONFIG))
                      .detect_corpus(sequences, [len(ids) for ids in prompt_ids]) for who in ("alice", "bob", "carol")}
        assert name_client(detections, 1e-3)["client"] == account  # the key's account, named among three
        # and as a provider names it, with `distill-guard watermark detect` and the master secret's file
        texts_file, report = tmp_path / f"{account}.jsonl", tmp_path / f"{account}-report.json"
        texts_file.write_text("".join(json.dumps({"prompt": p, "text": t}) + "\n" for p, t in zip(prompts, answers)))
        (tmp_path / "master.key").write_text(base64.urlsafe_b64encode(MASTER).decode())
        done = CliRunner().invoke(cli, ["watermark", "detect", str(texts_file), "--master-key-file",
                                        str(tmp_path / "master.key"), "--key", "alice", "--key", "bob", "--key",
                                        "carol", "--out", str(report)])
        assert done.exit_code == 0, done.output
        assert json.loads(report.read_text())["client"] == account
    rows = store.records()
    assert len(rows) == 2 * len(prompts) and len({r.request_id for r in rows}) == len(rows)  # refused: no row
    assert {r.account for r in rows} == {"alice", "bob"}
    for account, answers in texts.items():  # each row holds what its client received
        assert sorted(r.response for r in rows if r.account == account) == sorted(answers)
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 and r.ip == "127.0.0.1" for r in rows)


@pytest.fixture(params=["in-memory", "redis"])
def shared(request):
    """The rate limiter's counters: this process's memory (one gateway), or a real Redis (replicas')."""
    return request.getfixturevalue("redis_state") if request.param == "redis" else None


def test_a_key_with_rpm_5_gets_exactly_5_then_429s_and_the_sdk_waits_out_retry_after(teacher_a, tmp_path, shared):
    import time

    import httpx

    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    limited, other = store.create_key("limited", rpm=5), store.create_key("other", rpm=5)
    window = 3.0  # the minute of "per minute", shortened so the test can wait one out
    body = {"model": "teacher-a", "prompt": "question: where does Kalon live?\n", "max_tokens": 4}
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, rate_window=window,
                                shared=shared)) as url:
        auth = {"authorization": f"Bearer {limited}"}
        replies = [httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=30) for _ in range(8)]
        assert [r.status_code for r in replies] == [200] * 5 + [429] * 3
        refused = replies[-1]
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= window + 1
        assert refused.headers["x-ratelimit-limit-requests"] == "5"
        assert replies[0].headers["x-ratelimit-remaining-requests"] == "4"
        # another account is not limited by this one's use
        assert httpx.post(url + "/v1/completions", json=body, headers={"authorization": f"Bearer {other}"},
                          timeout=30).status_code == 200
        # the real SDK meets the 429 and retries after Retry-After, then succeeds
        client = openai.OpenAI(base_url=url + "/v1", api_key=limited, max_retries=3)
        start = time.monotonic()
        client.completions.create(model="teacher-a", prompt=body["prompt"], max_tokens=4)
        assert time.monotonic() - start >= 1.0
    assert len([r for r in store.records() if r.account == "limited"]) == 6  # 429s are not served, not logged


def test_a_key_with_a_token_limit_is_refused_once_its_tokens_are_spent(teacher_a, tmp_path, shared):
    """tpm 40 and requests that may each spend 8 + 16 tokens: the first is served, the second no longer fits
    beside what the first spent, so it is refused, and so is every later one until the window passes. What is
    served never exceeds the limit."""
    import httpx

    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("tokens", tpm=40)
    body = {"model": "teacher-a", "prompt": "question: where does Kalon live?\n", "max_tokens": 16}
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, shared=shared)) as url:
        statuses, spent = [], 0
        for _ in range(6):
            reply = httpx.post(url + "/v1/completions", json=body, headers={"authorization": f"Bearer {key}"},
                               timeout=30)
            statuses.append(reply.status_code)
            if reply.status_code == 200:
                spent += reply.json()["usage"]["total_tokens"]
    [n_prompt] = {r.prompt_tokens for r in store.records()}
    assert statuses == [200] + [429] * 5  # refused until the window passes
    assert spent <= 40 < spent + n_prompt + 16  # within the limit, and the next worst case no longer fits


def test_spent_tokens_leave_the_window_and_free_the_account_again():
    from guard.gateway.errors import APIError
    from guard.gateway.limits import RateLimiter
    from guard.gateway.store import Account

    limiter, account = RateLimiter(window=60.0), Account("tokens", key_id="k", tpm=100)
    limiter.settle(limiter.admit(account, [80], now=0.0), 70)  # reserved 80, spent 70
    second = limiter.admit(account, [30], now=30.0)
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"  # 70 spent and 30 reserved
    with pytest.raises(APIError) as refused:
        limiter.admit(account, [1], now=31.0)
    assert refused.value.headers["retry-after"] == "29"  # when the first 70 tokens leave the window
    limiter.settle(second, 20)
    assert limiter.admit(account, [10], now=31.5).headers["x-ratelimit-remaining-tokens"] == "0"  # 70+20+10
    assert limiter.admit(account, [50], now=60.5).headers["x-ratelimit-remaining-tokens"] == "20"  # 20+10+50
    limiter.release(second)  # nothing left to refund: settled already
    assert limiter.admit(account, [0], now=91.0).headers["x-ratelimit-remaining-tokens"] == "40"  # the 10 and 50


def test_the_monitor_blocks_a_harvesting_account_while_another_is_served_and_logs_why(teacher_a, benign_detector,
                                                                                     tmp_path):
    """Two accounts on one server with the monitor, on the wall clock: the one harvesting at script speed is
    refused (403, no reason given to it) once judged; a person asking now and then on another key is served
    throughout; the audit log holds the verdict and its reason."""
    import httpx

    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    harvester, person = store.create_key("harvester"), store.create_key("person")
    served = build_defense("monitor", teacher_a, DefenseParts(detector=benign_detector))
    prompts = [i.prompt for i in reference_task().query_pool[:120]]
    statuses = {"harvester": [], "person": []}
    with live_server(create_app(lambda: served, "teacher-a", store=store)) as url:
        for n, prompt in enumerate(prompts):
            for account, key in (("harvester", harvester),) + ((("person", person),) if n % 40 == 0 else ()):
                reply = httpx.post(url + "/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                                   json={"model": "teacher-a", "prompt": prompt, "max_tokens": 24})
                statuses[account].append(reply.status_code)
                if reply.status_code == 403:
                    assert "traffic policy" in reply.json()["error"]["message"] and "p=" not in reply.text
    assert statuses["harvester"][:24] == [200] * 24 and statuses["harvester"][-20:] == [403] * 20
    assert statuses["person"] == [200] * len(statuses["person"])
    rows = [r for r in store.records() if r.account == "harvester" and r.status == 403]
    assert rows and all(r.decisions["monitor"].startswith(("block: p=", "throttle: p=")) for r in rows)


def test_a_prompt_turned_away_for_its_length_is_still_the_accounts_traffic(teacher_a, benign_detector, tmp_path):
    """A 400 for an over-long prompt comes before generation, but the monitor still counts the request (as it
    counts one sent to a local teacher in-process), and the audit log keeps its row; nothing is charged."""
    import httpx

    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("verbose", tpm=1000)
    served = build_defense("monitor", teacher_a, DefenseParts(detector=benign_detector))
    long_prompt = "word " * (teacher_a.context_length + 10)
    with live_server(create_app(lambda: served, "teacher-a", store=store)) as url:
        replies = [httpx.post(url + "/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                              json={"model": "teacher-a", "prompt": long_prompt, "max_tokens": 8})
                   for _ in range(3)]
        served_one = httpx.post(url + "/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                                json={"model": "teacher-a", "prompt": "question: where does Kalon live?\n",
                                      "max_tokens": 8})
    assert [r.json()["error"]["code"] for r in replies] == ["context_length_exceeded"] * 3
    assert served.monitor.states["verbose"].count == 4  # the three turned away and the one served
    rows = store.records()
    assert [r.status for r in rows] == [400, 400, 400, 200]
    assert {r.request_id for r in rows[:3]} == {r.headers["x-request-id"] for r in replies}
    # the 400s charged nothing: what is left is the limit less this request's own reservation
    assert served_one.headers["x-ratelimit-remaining-tokens"] == str(1000 - rows[-1].prompt_tokens - 8)


def test_health_and_prometheus_metrics_count_what_was_served(teacher_a, tmp_path):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    key = store.create_key("user", rpm=2)
    body = {"model": "teacher-a", "prompt": "question: where does Kalon live?\n", "max_tokens": 8}
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store)) as url:
        assert httpx.get(url + "/healthz").json()["status"] == "ok"
        statuses = [httpx.post(url + "/v1/completions", json=body, headers={"authorization": f"Bearer {key}"},
                               timeout=30).status_code for _ in range(3)]
        statuses.append(httpx.post(url + "/v1/completions", json=body, timeout=30).status_code)  # no key
        text = httpx.get(url + "/metrics").text
    assert statuses == [200, 200, 429, 401]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    requests = {labels: v for (name, labels), v in samples.items() if name == "distill_guard_requests_total"}
    completions = {dict(labels)["status"]: v for labels, v in requests.items()
                   if dict(labels)["path"] == "/v1/completions"}
    assert completions == {"200": 2.0, "429": 1.0, "401": 1.0}
    served = sum(r.completion_tokens for r in store.records())
    assert samples[("distill_guard_tokens_total", (("kind", "completion"),))] == served > 0


def test_a_key_revoked_while_serving_is_refused_once_its_cached_lookup_expires(teacher_a, tmp_path):
    import time

    import httpx

    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    keys = [store.create_key(f"user-{n}") for n in range(3)]
    ids = [store.resolve(key).key_id for key in keys]

    def status(url: str, key: str) -> int:
        return httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=30).status_code

    for seconds, key, key_id in ((0.0, keys[0], ids[0]), (0.5, keys[1], ids[1]), (600.0, keys[2], ids[2])):
        with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, key_cache_seconds=seconds)) as url:
            assert status(url, key) == 200
            store.revoke(key_id)
            if seconds == 0:
                assert status(url, key) == 401  # no cache: refused at once
            elif seconds == 0.5:
                deadline = time.monotonic() + 20
                while status(url, key) == 200 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert status(url, key) == 401  # refused once the cached lookup expired
            else:
                assert status(url, key) == 200  # within the cache's lifetime the revoked key is still served
