"""Reading the audit log a page at a time (issue 26, fault 7): by commit sequence, so that a page never repeats
forever (many rows share a time: every multi-prompt request's do) and a row committed after a reader passed its
time is still read. Through the admin API over HTTP, and two PostgreSQL writers racing. Real SQLite, real
PostgreSQL."""

import secrets
import threading
import time

import httpx
import psycopg

from conftest import live_server
from guard.gateway.app import create_app
from guard.gateway.store import AuditRecord, PostgresStore, SQLiteStore

PAGES = 20  # more than any test here needs: a reader that reaches it is going round in circles
LIMIT = 2


def row(request_id: str, at: float, account: str = "alice") -> AuditRecord:
    return AuditRecord(request_id, account, at, "question")


def read_all(page, after: int = 0) -> tuple[list[str], int]:
    """Every row's id after the cursor `after`, following the admin API's cursor until a page comes back short;
    and the cursor to read on from."""
    ids = []
    for _ in range(PAGES):
        body = page(after)
        ids += [r["request_id"] for r in body["data"]]
        after = body["next_seq"]
        if len(body["data"]) < LIMIT:
            return ids, after
    raise AssertionError(f"still paging after {PAGES} pages: {ids[:12]} ...")


def test_the_admin_api_pages_through_more_same_time_rows_than_a_page_and_later_commits(teacher_a, tmp_path):
    store = SQLiteStore(tmp_path / "gateway.db")
    admin_key = secrets.token_urlsafe(32)
    store.log(*(row(f"batch-{i}", 1000.0) for i in range(5)))  # one request of 5 prompts: one time
    with live_server(create_app(lambda: teacher_a, "teacher-a", store=store, admin_key=admin_key)) as url:
        def page(after: int) -> dict:
            reply = httpx.get(f"{url}/admin/audit", params={"after_seq": after, "limit": LIMIT}, timeout=30,
                              headers={"authorization": f"Bearer {admin_key}"})
            assert reply.status_code == 200, reply.text
            return reply.json()

        ids, after = read_all(page)
        assert ids == [f"batch-{i}" for i in range(5)]
        assert page(after) == {"data": [], "next_seq": after}  # at the end, the cursor stays: poll it for more
        store.log(row("late", 999.0))  # a request that started before those rows (its time) and committed after
        assert read_all(page, after)[0] == ["late"]


def test_a_row_whose_commit_another_writer_overtakes_is_still_read_after_it(postgres_url):
    """Two replicas on one PostgreSQL log at once; the first one's commit is slow (a trigger holds its transaction
    a second after its row drew its sequence number). A reader that pages by sequence while the second commits
    must still read the first's row afterwards: a sequence number drawn earlier must not commit later."""
    slow, fast = PostgresStore(postgres_url), PostgresStore(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS "
                   "$$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$")
        db.execute("CREATE TRIGGER hold AFTER INSERT ON audit FOR EACH ROW WHEN (NEW.account = 'slow') "
                   "EXECUTE FUNCTION hold()")
    first = threading.Thread(target=slow.log, args=(row("first", 1.0, account="slow"),))
    first.start()
    time.sleep(0.3)  # the first row has its sequence number and waits in the trigger
    second = threading.Thread(target=fast.log, args=(row("second", 2.0),))
    second.start()
    seen, after = [], 0
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:  # a reader tailing the log
        page = fast.page(after_seq=after, limit=10)
        seen += [r.request_id for r in page]
        after = page[-1].seq if page else after
        time.sleep(0.05)
    first.join()
    second.join()
    assert sorted(seen) == ["first", "second"]
    slow.close()
    fast.close()


def test_a_reader_still_reads_rows_logged_after_retention_emptied_the_log(tmp_path):
    store = SQLiteStore(tmp_path / "gateway.db")
    store.log(*(row(f"old-{i}", 1.0) for i in range(3)))
    after = store.page()[-1].seq
    assert store.purge(older_than_seconds=10, now=100.0) == 3
    store.log(row("new", 100.0))
    assert [r.request_id for r in store.page(after)] == ["new"]  # its seq is not one a reader already passed
    store.close()
