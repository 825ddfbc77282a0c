"""The server keeps the caller: each API key resolves to its account, the account reaches every defence, and
every request lands in the audit log before its response is sent. Real HTTP, the real `openai` SDK, real
SQLite."""

import openai
import pytest

from conftest import live_server
from eval.reference.world import reference_task
from guard.defenses import DefenseParts, build_defense
from guard.server import create_app
from guard.store import open_store
from watermark.detect import WatermarkDetector, name_client
from watermark.kgw import GreenList, WatermarkConfig, WatermarkKey

MASTER = b"test-master-secret-0123456789abcdef"
CONFIG = WatermarkConfig(delta=4.0)


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
    rows = store.records()
    assert len(rows) == 2 * len(prompts) and len({r.request_id for r in rows}) == len(rows)  # refused: no row
    assert {r.account for r in rows} == {"alice", "bob"}
    for account, answers in texts.items():  # each row holds what its client received
        assert sorted(r.response for r in rows if r.account == account) == sorted(answers)
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 and r.ip == "127.0.0.1" for r in rows)
