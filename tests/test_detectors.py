"""Traffic events, the simulator and the per-client detector (issue 6, first part)."""

import json
from collections import Counter
from dataclasses import replace
from itertools import combinations

import numpy as np
import pytest
from conftest import BENIGN_MIX
from scipy.stats import binom

from detectors.detector import EXCLUDED, TrafficDetector
from detectors.events import Event, EventFormatError, events_from_rows, read_events, write_events
from detectors.features import EXTRACTION, ClientState, embedding_features
from eval.traffic import BENIGN_POPULATION, SAME_DOMAIN, simulate


def test_a_bad_log_row_is_an_error_naming_file_and_row_or_is_skipped_and_counted(tmp_path):
    good = {"client": "k1", "time": 1_700_000_000, "prompt": "hi", "response_tokens": 5}
    rows = [good, {"client": "k1", "prompt": "no time"}, {**good, "time": "yesterday"},
            {**good, "response_tokens": -3}, {**good, "time": "2026-01-01T00:00:00Z"}]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    with pytest.raises(EventFormatError, match=r"log.jsonl: row 2: missing required field 'time'"):
        read_events(path)
    events, skipped = read_events(path, errors="skip")
    assert len(events) == 2 and skipped == 4
    assert events[1].time == pytest.approx(1_767_225_600.0)  # ISO-8601 understood
    with pytest.raises(EventFormatError, match="row 6: not JSON"):
        events_from_rows([good] * 5 + [ValueError("not JSON (Expecting value at column 1)")], "log")
    with pytest.raises(FileNotFoundError):
        read_events(tmp_path / "missing.jsonl")


def test_events_round_trip_through_jsonl_and_arrow(tmp_path):
    import datasets

    events, _ = simulate({"human": 3, "naive": 1}, days=1, seed=3, attack_budget=50)
    write_events(events, tmp_path / "log.jsonl")
    again, skipped = read_events(tmp_path / "log.jsonl")
    assert again == events and skipped == 0
    datasets.Dataset.from_list([vars(e) for e in events]).save_to_disk(str(tmp_path / "log.arrow.d"))
    assert read_events(tmp_path / "log.arrow.d")[0] == events


def test_simulation_is_deterministic_and_labels_every_client():
    population = {"human": 5, "power": 1, "batch": 1, "naive": 1, "sybil": 1, "hydra": 1}
    first, labels = simulate(population, days=1, seed=7, attack_budget=300, sybil_accounts=6)
    second, _ = simulate(population, days=1, seed=7, attack_budget=300, sybil_accounts=6)
    assert first == second
    counts = Counter(labels.values())
    assert counts["sybil"] == 6 and counts["human"] == 5 and set(labels) == {e.client for e in first}
    sybil = [e for e in first if labels[e.client] == "sybil"]
    assert len({e.payment for e in sybil}) == 1 and len(sybil) == 300  # one swarm, budget split over accounts
    times = [e.time for e in first]
    assert times == sorted(times)


def test_template_reuse_is_found_by_minhash():
    templated = [f"Classify the sentiment of this customer review as positive or negative: the {w} was fine"
                 for w in ["food", "room", "staff", "view", "price", "bed"]]
    distinct = ["How do I sort a list in python?", "Write a poem about the sea.", "What is the capital of Peru?",
                "Fix the grammar: me and him goes there.", "Explain docker volumes.", "Translate hola into English."]
    def template_share(prompts):
        state = ClientState()
        for i, p in enumerate(prompts):
            state.update(Event("c", float(i), p))
        return state.features()["template_share"]

    assert template_share(templated) >= 5 / 6 and template_share(distinct) == 0


def test_embedding_features_separate_reference_questions_from_prose_prompts():
    from detectors.features import Embedder

    embed = Embedder()
    benign, labels = simulate({"human": 20, "naive": 1}, days=2, seed=5, attack_budget=64)
    human = [e.prompt for e in benign if labels[e.client] == "human"][:64]
    attack = [e.prompt for e in benign if labels[e.client] == "naive"][:64]
    reference = embed(human[:32])
    bandwidth = 1.0
    attack_features = embedding_features(embed(attack), reference, bandwidth)
    human_features = embedding_features(embed(human[32:]), reference, bandwidth)
    assert attack_features["mmd"] > 3 * human_features["mmd"]
    assert attack_features["spread"] < human_features["spread"]  # a harvester's prompts cluster


def test_the_embedding_cache_keeps_the_most_recently_used_prompts_up_to_its_size():
    from detectors.features import Embedder

    embed = Embedder(cache_size=4)
    prompts = [f"How do I {verb} in python?" for verb in ("sort a list", "read a file", "parse dates",
                                                            "split a string", "profile memory", "write a test")]
    vectors = embed(prompts)  # more prompts in one call than the cache keeps
    expected = embed.model.encode(prompts, normalize_embeddings=True, convert_to_numpy=True)
    assert np.allclose(vectors, expected, atol=1e-5) and list(embed.cache) == prompts[2:]
    embed(prompts[2:3])  # used again: now the most recent
    embed(["How do I merge branches in git?"])
    assert list(embed.cache) == [*prompts[4:], prompts[2], "How do I merge branches in git?"]


def test_detector_flags_harvesters_a_reasoning_seeker_at_once_the_others_past_evaluation_customers_volume(
        benign_detector):
    """Nobody benign asks for every intermediate step, so `cot` is flagged at its first checkpoint. Evaluation
    customers ask what the others ask, as they do, up to a few hundred questions: those are flagged once
    they have asked more than that (by the 800 checkpoint)."""
    traffic, labels = simulate({"naive": 5, "cot": 5, "slow": 5, "mimic": 5}, days=3, seed=1)
    verdicts = benign_detector.score(traffic)
    for kind in ("naive", "cot", "slow", "mimic"):
        mine = [v for c, v in verdicts.items() if labels[c] == kind]
        assert all(v["flagged"] and v["p_value"] <= 0.01 for v in mine), (kind, mine)
    def median_flag(kind):
        return np.median([v["queries_to_flag"] for c, v in verdicts.items() if labels[c] == kind])
    assert median_flag("cot") <= 50 and median_flag("naive") <= 800 and median_flag("mimic") <= 800


@pytest.mark.slow
def test_benign_false_positive_rate_holds_on_fresh_seeds(benign_detector):
    """Calibrated at 1% on held-out benign clients of seed 0; on benign traffic from seeds it never saw,
    the number flagged must be consistent with Binomial(n, 0.01): above the 99.9% quantile fails."""
    flagged = total = 0
    for seed in (11, 12):
        traffic, _ = simulate(BENIGN_MIX, days=3, seed=seed)
        verdicts = benign_detector.score(traffic)
        flagged += sum(v["flagged"] for v in verdicts.values())
        total += len(verdicts)
    assert flagged <= binom.ppf(0.999, total, 0.01), (flagged, total)


def test_the_default_benign_population_asks_the_teachers_own_questions_and_those_users_pass(benign_detector):
    """Students, evaluation customers and users who follow up on their answers ask what a distiller asks. They are part of the population the lab's
    detector is fitted and calibrated on (and every test's, which is half of it), so asking the task's
    questions is not what gets a client flagged: on a seed the detector never saw, each kind is flagged no
    more often than a 1% rate allows. Fitted without them, the detector flags students by the dozen."""
    assert BENIGN_POPULATION["student"] >= 200 and BENIGN_POPULATION["evaluator"] >= 50
    assert all(BENIGN_MIX[kind] == BENIGN_POPULATION[kind] // 2 for kind in SAME_DOMAIN)
    traffic, labels = simulate({"student": 300, "evaluator": 80, "followup": 200}, days=3, seed=13)
    verdicts = benign_detector.score(traffic)
    for kind in SAME_DOMAIN:
        judged = [v for c, v in verdicts.items() if labels[c] == kind and v["judged"]]
        assert len(judged) >= 60, kind
        assert sum(v["flagged"] for v in judged) <= binom.ppf(0.999, len(judged), 0.01), kind


@pytest.mark.slow
def test_leaving_out_the_extraction_features_flags_students_and_delays_the_reasoning_harvester(benign_detector):
    """The ablation the traffic study reports, at one seed: the extraction features (how rare and how new
    the asked-about things are, the share asking for reasoning) are what lets students who ask the task's
    questions through; without them more of 300 are flagged (7 against 4 at this seed; a dozen against a few
    before the population had users who follow up on their answers to fit on) and a harvester asking for
    every intermediate step waits until it has sent a few hundred requests."""
    traffic, labels = simulate({"student": 300, "cot": 5}, days=3, seed=13)
    benign, _ = simulate(BENIGN_POPULATION, days=3, seed=0)
    ablated = TrafficDetector(use_embeddings=False, exclude=EXCLUDED + EXTRACTION).fit(benign)
    assert not set(ablated.feature_names_) & set(EXTRACTION)

    def outcome(detector):
        verdicts = detector.score(traffic)
        students = sum(v["flagged"] for c, v in verdicts.items() if labels[c] == "student")
        cot = np.median([v["queries_to_flag"] or np.inf for c, v in verdicts.items() if labels[c] == "cot"])
        return students, cot

    (students, cot), (students_ablated, cot_ablated) = outcome(benign_detector), outcome(ablated)
    assert students <= 4 and cot <= 50
    assert students_ablated >= students + 3 and cot_ablated >= 4 * cot, (students_ablated, cot_ablated)


def test_a_log_too_young_to_judge_gives_unjudged_verdicts_not_an_error(benign_detector):
    """A new gateway's audit log: every client still below the first checkpoint."""
    young = [Event(client=c, time=1e9 + i, prompt=f"question {i}") for c in ("acme", "beta") for i in range(3)]
    verdicts = benign_detector.score(young)
    assert set(verdicts) == {"acme", "beta"}
    assert all(not v["judged"] and v["p_value"] == 1.0 and not v["flagged"] for v in verdicts.values())


def test_detector_refuses_a_calibration_set_too_small_for_its_fpr():
    benign, _ = simulate({"human": 30}, days=1, seed=0)
    with pytest.raises(ValueError, match="calibration clients cannot resolve"):
        TrafficDetector(target_fpr=0.01, use_embeddings=False).fit(benign)


def test_clustering_finds_a_planted_swarm_and_flags_it_as_a_group(benign_detector):
    from detectors.cluster import clusters, judge_clusters

    traffic, labels = simulate({"human": 60, "power": 15, "batch": 30, "sybil": 1}, days=3, seed=4, sybil_accounts=10)
    groups = clusters(traffic)
    swarm = sorted(c for c, k in labels.items() if k == "sybil")
    assert groups == [swarm]  # exactly the swarm: batch customers sharing a job template are not linked
    judged = judge_clusters(benign_detector, traffic)
    assert judged[0]["flagged"] and judged[0]["members"] == swarm


WORDS = ("apple", "river", "stone", "cloud", "paper", "glass", "music", "tiger", "bread", "light", "chair",
         "ocean", "piano", "garden", "silver", "winter", "market", "candle", "bridge", "forest", "engine", "pencil")
SIGNALS = ("network", "timing", "templates", "coverage")
# What the benign population asks: common words, in three wordings, and each of 216 names once (rare).
NAMES = [a + b + c for a in ("ka", "lo", "ri", "te", "mo", "su") for b in ("ra", "vi", "do", "ne", "pu", "xo")
         for c in ("n", "k", "s", "th", "l", "m")]
WORDINGS = ("Tell me about {n}.", "Who is {n} anyway?", "Describe {n} in a line.")


def hand_built_popularity():
    from detectors.features import Popularity

    rng = np.random.default_rng(1)
    prompts = [" ".join(rng.choice(WORDS, 6)) for _ in range(500)]
    prompts += [w.format(n=word) for w in WORDINGS for word in WORDS] + [f"tell me about {n}" for n in NAMES]
    popularity = Popularity(prompts)
    once = popularity.key("tell me about " + NAMES[0])[1]
    return popularity, once - 1e-6  # asking about names nobody asks twice is rare


def hand_built_accounts(shared: set[str], t0: float, rng) -> list[Event]:
    """Three accounts, each with its own payment fingerprint, that share exactly the `shared` signals."""
    events = []
    for a in range(3):
        client = f"group-{a}"
        ip = f"203.0.113.{10 + a}" if "network" in shared else f"198.51.{a}.7"
        # Out of step, pairs differ in start only (0, 1), in pace only (1, 2), or in both (0, 2).
        start, pace = (t0 + 10 * a, 30.0) if "timing" in shared else [(t0 - 3600, 30.0), (t0, 30.0), (t0 + 10, 90.0)][a]
        for k in range(20):
            if "coverage" in shared:  # rare names, none asked by two accounts; one wording, or one each
                name = NAMES[20 * a + k].capitalize()
                prompt = (WORDINGS[0] if "templates" in shared else WORDINGS[a]).format(n=name)
            elif "templates" in shared:  # one wording; only names and numbers change
                prompt = f"Summarise what {rng.choice(['Kalon', 'Ridan', 'Tilden'])} told Mara about {k} invoices."
            else:
                prompt = " ".join(rng.choice(WORDS, 6))
            events.append(Event(client, start + k * pace, prompt, ip=ip, payment=f"card-{client}"))
    return events


def unrelated_accounts(count: int, t0: float, rng) -> list[Event]:
    """Accounts that share nothing: own payment, own /24, far-apart starts, own wording."""
    return [Event(f"unrelated-{i}", t0 + 5000 * i + k * (20.0 + 13 * i), " ".join(rng.choice(WORDS, 6)),
                  ip=f"100.64.{i}.1", payment=f"card-unrelated-{i}")
            for i in range(count) for k in range(20)]


# Every subset of the four weak signals; by design two of them link accounts and one alone does not
# (colleagues share an office network, two batch jobs may share a template, two evaluation customers both
# ask about everything).
@pytest.mark.parametrize("shared", [set(c) for n in range(5) for c in combinations(SIGNALS, n)],
                         ids=lambda shared: "+".join(sorted(shared)) or "nothing")
def test_accounts_with_distinct_payments_are_linked_by_any_two_weak_signals(shared):
    from detectors.cluster import clusters

    rng = np.random.default_rng(0)
    t0 = 1_700_000_000.0
    popularity, rare = hand_built_popularity()
    group = hand_built_accounts(shared, t0, rng)
    control = unrelated_accounts(10, t0 + 20_000, rng)
    assert len({e.payment for e in group}) == 3
    expected = [["group-0", "group-1", "group-2"]] if len(shared) >= 2 else []
    assert clusters(group + control, min_size=2, popularity=popularity, rare_surprisal=rare) == expected


def test_accounts_asking_about_the_same_rare_things_are_not_joint_coverage():
    """Joint coverage is a harvest split between accounts: rare things, none asked twice. Three accounts in
    step asking about the same rare names share one signal (timing), not two."""
    from detectors.cluster import clusters

    popularity, rare = hand_built_popularity()
    t0 = 1_700_000_000.0
    split = hand_built_accounts({"timing", "coverage"}, t0, np.random.default_rng(0))
    same = [replace(e, prompt=WORDINGS[int(e.client[-1])].format(n=NAMES[k % 20].capitalize()))
            for k, e in enumerate(split)]
    assert clusters(split, min_size=2, popularity=popularity, rare_surprisal=rare) == [["group-0", "group-1", "group-2"]]
    assert clusters(same, min_size=2, popularity=popularity, rare_surprisal=rare) == []


@pytest.mark.slow
def test_detect_and_simulate_commands(tmp_path):
    import subprocess
    import sys

    log, labels, report = tmp_path / "log.jsonl", tmp_path / "labels.json", tmp_path / "report.json"
    cli = [sys.executable, "-m", "guard.cli"]
    subprocess.run(cli + ["traffic", "simulate", "--out", str(log), "--labels", str(labels), "--population", "human=30",
                          "--population", "naive=1", "--days", "1", "--attack-budget", "900"],
                   check=True, capture_output=True, text=True, timeout=300)
    unfitted = subprocess.run(cli + ["detect", "--log", str(log)], capture_output=True, text=True, timeout=300)
    assert unfitted.returncode != 0 and "--benign" in unfitted.stderr  # never fitted on lab traffic unasked
    done = subprocess.run(cli + ["detect", "--log", str(log), "--lab", "--out", str(report)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    verdicts = json.loads(report.read_text())["clients"]
    kinds = json.loads(labels.read_text())
    assert all(v["flagged"] for c, v in verdicts.items() if kinds[c] == "naive")
    log.write_text(log.read_text() + '{"client": "x", "prompt": "no time"}\n')
    bad = subprocess.run(cli + ["detect", "--log", str(log), "--lab"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "missing required field 'time'" in bad.stderr


@pytest.mark.slow
def test_traffic_study_smoke_at_toy_scale(tmp_path):
    """Smoke test of the study's plumbing, on the test population, one seed, a tiny attack; its numbers
    come from `distill-guard study traffic` at full scale."""
    from eval.traffic_study import SHAPES, main

    # The benign replay only prices the monitor for benign users in the protection rows, which nothing here
    # checks, and it is replayed through each of the 7 monitored attacks: a day of 21 light users (624
    # requests) carries the 40 held-out items. The 26 users before sent 3,452 (each batch user ~1,450), and
    # replaying them 7 times took about 40 of the test's 90 s.
    report = main(str(tmp_path), [1], budget=60, attack_seeds=1, fit_mix=BENIGN_MIX, variants=("timing+content",),
                  steps=5, eval_items=40, progress=False, ablate=False,
                  replay_mix={"human": 10, "power": 1, "student": 10})
    detection = report["timing+content"]["detection"]
    # 60 requests reach two checkpoints only: at this toy scale half the naive harvesters are blocked there
    # (all were, before the fit had users who follow up on their answers)
    assert detection["naive"]["blocked"]["share"] >= 0.5 and detection["student"]["accounts"] == BENIGN_MIX["student"]
    assert 0 <= detection["student"]["refused_share"] < 0.1
    shapes = {(r["attack"], r["shape"]) for r in report["protection"]}
    assert shapes == {("naive/sft", k) for k in [*SHAPES, "undefended"]} | {("decompose/sft", "decompose"),
                                                                           ("decompose/sft", "undefended")}
    text = (tmp_path / "report.md").read_text()
    assert "| naive | 10 | " in text and "| naive/sft (swarm of 100) | monitor | 60 |" in text
