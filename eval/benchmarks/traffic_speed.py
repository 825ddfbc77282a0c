"""Traffic detector speed and memory.

    OMP_NUM_THREADS=1 distill-guard bench traffic [--events 50000]

- events/s of the online monitor (non-embedding features, scoring at checkpoints), on simulated traffic, with
  cross-account linking on (the default) and off, side by side in one run;
- sentence-embedding throughput (MiniLM prompts/s, batched), reported separately: the embedding features
  run only at checkpoints, on a bounded sample of each client's prompts;
- memory of one client's state after 2,000 and after 100,000 requests (it should not grow: later windows of
  a client's life reuse the same state).
"""

from __future__ import annotations

import json
import time
import tracemalloc

import torch

from detectors.detector import TrafficDetector
from detectors.events import Event
from detectors.features import ClientState, Embedder, Popularity
from detectors.monitor import Monitor
from eval.benchmarks import write_result
from eval.traffic import BENIGN_POPULATION, simulate


def monitor_speed(events: int) -> dict:
    benign, _ = simulate(BENIGN_POPULATION, days=3, seed=0)  # the monitor defence's own fit
    detector = TrafficDetector(use_embeddings=False).fit(benign)
    traffic, _ = simulate({**BENIGN_POPULATION, "naive": 5, "slow": 5, "mimic": 5, "sybil": 1, "swarm": 1}, days=3,
                          seed=1)
    traffic = traffic[:events]
    out = {"events": len(traffic)}
    for name, link in (("with_linking", True), ("without_linking", False)):
        monitor = Monitor(detector, link=link)
        start = time.perf_counter()
        for event in traffic:
            monitor.observe(event)
        seconds = time.perf_counter() - start
        out[name] = {"clients": len(monitor.states), "seconds": seconds, "events_per_s": len(traffic) / seconds}
        if link:
            out[name]["linked_accounts"] = len(monitor.linker.parent)
    return out


def embedding_speed(prompts: int = 2048) -> dict:
    traffic, _ = simulate({"human": 200}, days=3, seed=2)
    texts = list(dict.fromkeys(e.prompt for e in traffic))[:prompts]
    embed = Embedder()
    embed(texts[:64])  # warm-up
    embed.cache.clear()
    start = time.perf_counter()
    embed(texts)
    seconds = time.perf_counter() - start
    return {"prompts": len(texts), "prompts_per_s": len(texts) / seconds}


def state_memory(marks: tuple[int, int] = (2_000, 100_000)) -> dict:
    traffic, _ = simulate({"naive": 1}, days=3, seed=3, attack_budget=marks[-1])
    popularity = Popularity([e.prompt for e in simulate({"student": 100}, days=3, seed=4)[0]])
    sizes = {}
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state = ClientState(popularity=popularity)
    for i, event in enumerate(traffic, 1):
        state.update(Event(event.client, event.time, event.prompt))
        if i in marks:
            sizes[f"bytes_after_{i}"] = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return sizes


def main(events: int = 50_000) -> dict:
    results = {"monitor": monitor_speed(events), "embedding": embedding_speed(), "client_state": state_memory(),
               "torch_threads": torch.get_num_threads()}
    print(json.dumps(results, indent=2))
    print("wrote", write_result("traffic_speed", results))
    return results
