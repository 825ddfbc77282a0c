"""A provider's question: would the rate-pattern monitor catch harvesters on our API, and at what cost?

Fits the detector on simulated benign traffic (humans, power users, templated batch customers), scores a
fresh three days of traffic with a naive harvester, a chain-of-thought harvester and a sybil swarm mixed in, and
replays the same traffic through the online monitor to show when each harvester is stopped and why, and
how many benign requests were refused on the way.

    python examples/provider_traffic_monitor.py
"""

import argparse
from collections import Counter

from detectors.cluster import judge_clusters
from detectors.detector import TrafficDetector
from detectors.monitor import Monitor
from eval.traffic import BENIGN_POPULATION, simulate


def main(scale: float, fpr: float, seed: int) -> None:
    benign_mix = {kind: max(1, round(n * scale)) for kind, n in BENIGN_POPULATION.items()}
    fit_on, _ = simulate(benign_mix, days=3, seed=0)
    detector = TrafficDetector(target_fpr=fpr, use_embeddings=False).fit(fit_on)
    print(f"fitted on {len(fit_on):,} benign requests from {sum(benign_mix.values())} clients, target FPR {fpr:g}")

    # scored traffic spans as long as the fitted traffic: the features of a client's history (rates over
    # its span, say) are only comparable between windows of one length
    traffic, kinds = simulate({**benign_mix, "naive": 1, "cot": 1, "sybil": 1}, days=3, seed=seed)
    verdicts = detector.score(traffic)
    for group in judge_clusters(detector, traffic):
        for member in group["members"]:
            verdicts[member]["flagged"] |= group["flagged"]
    flagged = Counter(kinds[c] for c, v in verdicts.items() if v["flagged"])
    clients = Counter(kinds.values())
    for kind in sorted(clients):
        print(f"  {kind:>6}: {flagged[kind]} of {clients[kind]} accounts flagged")

    monitor, stopped, refused = Monitor(detector), {}, Counter()
    for event in traffic:
        action = monitor.observe(event)
        if not action.served:
            refused[kinds[event.client] in BENIGN_POPULATION] += 1
            stopped.setdefault(event.client, action)
    for client, action in stopped.items():
        if kinds[client] not in BENIGN_POPULATION:
            print(f"  online: {kinds[client]} account {client} -> {action.kind}: {action.reason}")
    benign_requests = sum(kinds[e.client] in BENIGN_POPULATION for e in traffic)
    print(f"benign requests refused online: {refused[True]} of {benign_requests:,} "
          f"({refused[True] / benign_requests:.2%})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="size of the benign population, as a share "
                                                                   "of the default 600 clients")
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    main(args.scale, args.fpr, args.seed)
