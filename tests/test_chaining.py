"""Answer chaining: events carry what the client was answered, and the features read which of its questions
ask about what its own answers named."""

import sqlite3

import numpy as np
import pytest

from conftest import live_server
from detectors.detector import TrafficDetector
from detectors.events import Event, read_events, write_events
from detectors.features import ENTITIES, ClientState, Popularity
from detectors.monitor import Monitor
from eval.harvest import Budget, Harvester
from eval.reference.world import reference_task
from eval.strategies import decompose
from eval.traffic import BENIGN_POPULATION, ShapedClient, TrafficShape, simulate
from guard.gateway.app import create_app
from guard.gateway.store import SQLiteStore
from guard.monitored import Monitored
from guard.openai_teacher import OpenAITeacher
from guard.teacher import Sampling

# "anna" is popular (everyone asks about her); the other names are rare: entities when an answer names them
POPULARITY = Popularity(["who is the boss of anna?", "where does anna live?", "what is the job of anna?",
                         "who is the friend of anna?"] * 100 + ["who is the boss of kavro?", "where does zumith live?"])


def chained_client(answered: bool) -> list[Event]:
    """A decomposer's four requests: a first hop, then three things about the person its answer named."""
    asks = [("who is the boss of kavro?", "the boss of kavro is zumith. answer: zumith"),
            ("where does zumith live?", "zumith lives in tilden. answer: tilden"),
            ("who is the friend of zumith?", "the friend of zumith is bolox. answer: bolox"),
            ("what is the job of zumith?", "zumith is a baker. answer: baker")]
    return [Event("c", float(t), prompt, response=response if answered else None)
            for t, (prompt, response) in enumerate(asks)]


def features(events: list[Event]) -> dict[str, float]:
    state = ClientState(popularity=POPULARITY)
    for event in events:
        state.update(event)
    return state.features()


def test_a_question_about_the_person_an_answer_named_is_chained_and_the_same_questions_unanswered_are_not():
    chained = features(chained_client(answered=True))
    assert chained["chain_share"] == 3 / 4  # the three asks about zumith, learned from the first answer
    assert chained["chain_fanout"] == 3  # three distinct things asked about her
    unanswered = features(chained_client(answered=False))
    assert unanswered["chain_share"] == unanswered["chain_fanout"] == 0


def test_a_name_the_client_asked_about_before_an_answer_named_it_is_not_learned_and_its_return_is_no_lift():
    """A client covering the space asks about zumith, is told about her in another answer, asks again: that is
    a return to its own question, not a chain, and it lowers the lift. A decomposer's lift is its share: every
    question about zumith asks about what an answer taught it."""
    covering = [Event("c", 0.0, "where does zumith live?", response="zumith lives in tilden."),
                *chained_client(answered=True)[:2]]
    row = features(covering)
    assert row["chain_share"] == 0 and row["chain_lift"] == -1 / 3
    decomposer = features(chained_client(answered=True))
    assert decomposer["chain_lift"] == decomposer["chain_share"] == 3 / 4


def test_popular_words_and_the_prompts_own_words_are_never_entities():
    """Entities are the answer's words that at most 1% of benign prompts use ("and" among them here: this
    population never says it), less the prompt's own words and words of two letters."""
    assert POPULARITY.entities("who is the boss of kavro?", "the boss of kavro is anna and zumith") == {"and", "zumith"}


def test_the_monitor_learns_from_answers_as_a_logs_events_teach_the_offline_detector(tmp_path, benign_detector):
    """Online, the gateway hands each finished completion to the monitor (`answered`); offline, a log's event
    carries it (a JSONL `response`): the same client's features agree, and without answers it chains nothing."""
    events = [Event(e.client, e.time + 1_767_225_600, e.prompt, response=e.response) for e in chained_client(True)]
    write_events(events, tmp_path / "log.jsonl")
    read, _ = read_events(tmp_path / "log.jsonl")
    assert [e.response for e in read] == [e.response for e in events]
    offline = ClientState(popularity=benign_detector.popularity_)
    for event in read:
        offline.update(event)
    online, silent = Monitor(benign_detector), Monitor(benign_detector)
    for event in events:
        online.observe(Event(event.client, event.time, event.prompt))
        online.answered(event.client, event.prompt, event.response)
        silent.observe(Event(event.client, event.time, event.prompt))
    assert online.states["c"].features() == offline.features()
    assert online.states["c"].features()["chain_share"] > 0 == silent.states["c"].features()["chain_share"]


def test_what_a_client_learned_is_kept_in_a_ring_of_fixed_size_however_many_answers():
    state = ClientState(popularity=POPULARITY)
    rng = np.random.default_rng(0)
    for i in range(5_000):
        name = "".join(chr(97 + c) for c in rng.integers(0, 26, 8))
        state.update(Event("c", float(i), f"who is the boss of {name}?", response=f"the boss is {name}x. ok"))
    assert state.entities.shape == state.asks.shape == state.own_keys.shape == (ENTITIES,)
    assert state.entities.nbytes + state.asks.nbytes + state.own_keys.nbytes <= 2_048


@pytest.fixture(scope="module")
def chain_detector():
    """The lab's detector with the chain test on (off by default: see `TrafficDetector.chain_test`)."""
    benign, _ = simulate(BENIGN_POPULATION, days=3, seed=0)
    return TrafficDetector(use_embeddings=False, chain_test=True).fit(benign)


def test_a_decomposer_that_chains_answers_is_blocked_through_a_real_gateway(tmp_path, teacher_a, chain_detector):
    """The decomposition attacker (`eval.strategies.decompose`: first hops, then the second hop about each
    answer) through a gateway over loopback HTTP, on the lab clock at its scripted pace. The gateway's monitor
    reads each completion's text, and blocks the account at its 100th request (the first checkpoint the chain test judges) for chaining its answers: the
    neighbour model alone would serve it hundreds more (it asks as an evaluation customer does)."""
    store = SQLiteStore(tmp_path / "gateway.sqlite")
    key = store.create_key("decomposer")
    served = Monitored(teacher_a, Monitor(chain_detector))
    with live_server(create_app(lambda: served, "teacher-a", store=store, lab_clock=True)) as url:
        wire = OpenAITeacher(f"{url}/v1", "teacher-a", api_key=key, lab_clock=True)
        harvester = Harvester(ShapedClient(wire, TrafficShape(pace=2.0)), tmp_path / "harvest", Budget(queries=140),
                              Sampling(temperature=0.0, max_new_tokens=48), {"strategy": "decompose"}, progress=False)
        decompose(reference_task(), seed=0)(harvester)
    with sqlite3.connect(store.path) as db:
        statuses = [s for (s,) in db.execute("SELECT status FROM audit WHERE account = 'decomposer' ORDER BY seq")]
    store.close()
    assert len(statuses) == 140 and statuses[:99] == [200] * 99 and set(statuses[99:]) == {403}
    action = served.monitor.actions["decomposer"]
    assert action.kind == "block" and "answers chained" in action.reason
