"""Campaigns: a harvest spread over accounts that each look like an evaluation customer, found as a population."""

from dataclasses import replace

import pytest

from detectors.campaign import QuestionLog, find_campaigns
from eval.traffic import simulate

# the benign kinds that ask in the task's space, evaluation customers (who ask uniformly over it, as the parts
# of a harvest do) most of all
SAME_SPACE = {"student": 100, "evaluator": 60, "followup": 40, "batch": 10}


def campaigns(benign_detector, traffic, permutations: int = 99):
    log = QuestionLog(benign_detector.popularity_)
    for event in traffic:
        log.add(event)
    return find_campaigns(log.candidates(benign_detector.rare_key_surprisal_), permutations=permutations)


@pytest.mark.parametrize("accounts, each", [(10, 400), (40, 100)])
def test_a_harvest_spread_over_accounts_sharing_nothing_is_a_campaign_and_its_members_are_named(
        benign_detector, accounts, each):
    """Each part asks what an evaluation customer asks, as much; together they never ask a question twice,
    where 60 evaluation customers asking in the same space share questions all the time."""
    traffic, labels = simulate({**SAME_SPACE, "spread": 1}, days=3, seed=5, spread_accounts=accounts,
                               attack_budget=accounts * each)
    found = [c for c in campaigns(benign_detector, traffic) if c["alarm"]]
    named = {m["client"] for c in found for m in c["members"] if m["named"]}
    assert found and all(c["p_value"] == 1 / 100 for c in found)  # no redraw came near
    assert sum(labels[c] == "spread" for c in named) >= 0.8 * accounts
    assert sum(labels[c] != "spread" for c in named) <= 1


def test_a_day_of_benign_users_in_the_same_space_is_no_campaign_and_answers_are_what_it_reads(benign_detector):
    traffic, _ = simulate(SAME_SPACE, days=3, seed=6)
    assert not any(c["alarm"] for c in campaigns(benign_detector, traffic))
    spread, _ = simulate({"spread": 1}, days=3, seed=5, spread_accounts=10, attack_budget=4_000)
    unanswered = [replace(e, response=None) for e in traffic + spread]
    assert campaigns(benign_detector, unanswered) == []  # no answered question: nobody to compare
    with pytest.raises(ValueError, match="99"):
        find_campaigns({}, permutations=49)
