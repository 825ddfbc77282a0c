"""A provider's question: would the traffic monitor catch harvesters on our API, when our own users ask the
same questions, and at what cost to them?

Fits the detector on simulated benign traffic (people asking about code and prose, templated batch
customers, students asking the teacher's own task questions, evaluation customers running a benchmark of
them), then replays a fresh three days of traffic through the online monitor, as the gateway would, with a
naive harvester, a chain-of-thought harvester, a mimic hiding its harvest among a student's questions and a
swarm of 100 accounts (each with its own payment and network) mixed in. Prints, per kind, how many accounts
were blocked and how many of their requests were served, why each harvester was stopped, and what share of
each benign kind's requests were refused.

    python examples/provider_traffic_monitor.py
"""

import argparse
from collections import Counter

from detectors.detector import TrafficDetector
from detectors.monitor import Monitor
from eval.traffic import BENIGN, BENIGN_POPULATION, simulate


def main(scale: float, fpr: float, seed: int) -> None:
    benign_mix = {kind: max(1, round(n * scale)) for kind, n in BENIGN_POPULATION.items()}
    fit_on, _ = simulate(benign_mix, days=3, seed=0)
    detector = TrafficDetector(target_fpr=fpr, use_embeddings=False).fit(fit_on)
    print(f"fitted on {len(fit_on):,} benign requests from {sum(benign_mix.values())} clients, target FPR {fpr:g}")

    # scored traffic spans as long as the fitted traffic: rates over a client's span are only comparable
    # between histories of one length
    traffic, kinds = simulate({**benign_mix, "naive": 1, "cot": 1, "mimic": 1, "swarm": 1}, days=3, seed=seed)
    monitor = Monitor(detector)
    requests, refused, blocked, reasons = Counter(), Counter(), set(), {}
    for event in traffic:
        action = monitor.observe(event)
        kind = kinds[event.client]
        requests[kind] += 1
        refused[kind] += not action.served
        if action.kind == "block" and event.client not in blocked:
            blocked.add(event.client)
            reasons.setdefault(kind, f"{event.client} -> {action.kind}: {action.reason}")
    accounts = Counter(kinds.values())
    stopped = Counter(kinds[c] for c in blocked)
    for kind in sorted(accounts, key=lambda k: (k in BENIGN, k)):
        served = requests[kind] - refused[kind]
        print(f"  {kind:>9}: {stopped[kind]} of {accounts[kind]} accounts blocked; {served:,} of "
              f"{requests[kind]:,} requests served ({refused[kind] / requests[kind]:.2%} refused)")
    for kind, reason in reasons.items():
        if kind not in BENIGN:
            print(f"  why {kind}: {reason}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0,
                        help=f"size of the benign population, as a share of the default "
                             f"{sum(BENIGN_POPULATION.values())} clients")
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    main(args.scale, args.fpr, args.seed)
