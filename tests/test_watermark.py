"""The green-list watermark, its exact detector, per-client keys and the radioactivity plumbing."""

import functools
import hashlib
import hmac
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from eval.reference import MODELS_DIR
from eval.reference.world import reference_task
from guard.openai_teacher import OpenAITeacher
from guard.teacher import Caller, Sampling
from watermark.detect import WatermarkDetector, binomial_test, holm, name_client
from watermark.kgw import GreenList, GreenListProcessor, Watermark, WatermarkConfig, WatermarkKey, mix64
from watermark.radioactivity import audit, logged_windows, restrict_to, sampled_tuples

MASTER = b"test-master-secret-0123456789abcdef"
VOCAB = 1024


def numpy_mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64, written independently of the torch version."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def key(client="client-0"):
    return WatermarkKey.for_client(MASTER, client)


# A plain-Python green list, written from the scheme's description with Python ints, as the oracle for the
# torch one: key_c = HMAC-SHA256(master, client); two 64-bit seeds from SHA-256 of a domain tag and key_c;
# context hash = splitmix64-finaliser chain over the window (token * golden ratio + position); a token is
# green when the top 53 bits of mix(context hash ^ mix(token + token seed)) fall below gamma * 2^53.
U64 = (1 << 64) - 1


def py_mix64(x: int) -> int:
    x &= U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
    return x ^ (x >> 31)


@functools.cache
def py_seeds(client: str) -> tuple[int, int]:
    secret = hmac.new(MASTER, client.encode(), hashlib.sha256).digest()
    digest = hashlib.sha256(b"distill-guard watermark v1" + secret).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


def py_green(client: str, gamma: float, window: list[int], token: int) -> bool:
    context_seed, token_seed = py_seeds(client)
    h = context_seed
    for position, t in enumerate(window):
        h = py_mix64(h ^ ((int(t) * 0x9E3779B97F4A7C15 + position + 1) & U64))
    return py_mix64(h ^ py_mix64(int(token) + token_seed)) >> 11 < int(gamma * 2**53)


def py_mask(client: str, gamma: float, windows: list[list[int]], vocab: int) -> torch.Tensor:
    return torch.tensor([[py_green(client, gamma, w, t) for t in range(vocab)] for w in windows])


def test_torch_hash_matches_an_independent_uint64_implementation():
    rng = np.random.default_rng(0)
    values = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=10_000, dtype=np.int64)
    values[:4] = [0, -1, np.iinfo(np.int64).min, np.iinfo(np.int64).max]
    expected = numpy_mix64(values.view(np.uint64)).view(np.int64)
    assert np.array_equal(mix64(torch.from_numpy(values)).numpy(), expected)


# Both code paths: tabulated (h = 1, small vocabulary) and hashed per context (larger h or vocabulary).
@pytest.mark.parametrize("vocab,gamma,width", [(VOCAB, 0.25, 1), (30522, 0.25, 1), (VOCAB, 0.5, 2), (VOCAB, 0.1, 4)])
def test_green_lists_equal_a_plain_python_keyed_hash(vocab, gamma, width):
    green_list = GreenList(key("client-3"), vocab, WatermarkConfig(gamma=gamma, context_width=width))
    rng = np.random.default_rng(width)
    windows = rng.integers(0, vocab, size=(300, width)).tolist()
    tokens = rng.integers(0, vocab, size=300).tolist()
    expected = [py_green("client-3", gamma, w, t) for w, t in zip(windows, tokens)]
    assert green_list.green(torch.tensor(windows), torch.tensor(tokens)).tolist() == expected
    assert sum(expected) > 0 and not all(expected)
    few = windows[:3]
    assert torch.equal(green_list.mask(torch.tensor(few))[:, :VOCAB], py_mask("client-3", gamma, few, VOCAB))


@pytest.mark.parametrize("gamma,width", [(0.25, 1), (0.5, 2), (0.1, 4)])
def test_green_share_is_gamma_and_the_mask_agrees_with_pointwise_tests(gamma, width):
    green_list = GreenList(key(), VOCAB, WatermarkConfig(gamma=gamma, context_width=width))
    windows = torch.randint(0, VOCAB, (400, width), generator=torch.Generator().manual_seed(1))
    mask = green_list.mask(windows)
    n = mask.numel()
    assert abs(mask.float().mean().item() - gamma) < 4 * math.sqrt(gamma * (1 - gamma) / n)
    tokens = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(green_list.green(windows, tokens), mask[torch.arange(400), tokens])
    other = GreenList(key("client-1"), VOCAB, WatermarkConfig(gamma=gamma, context_width=width)).mask(windows)
    overlap = (mask & other).float().mean().item()  # independent keys: green lists overlap by chance only
    assert abs(overlap - gamma**2) < 4 * math.sqrt(gamma**2 * (1 - gamma**2) / n)


def test_the_whole_window_and_its_order_pick_the_green_list():
    green_list = GreenList(key(), VOCAB, WatermarkConfig(context_width=3))
    base = green_list.mask(torch.tensor([[5, 6, 7]]))
    for changed in ([[9, 6, 7]], [[5, 9, 7]], [[5, 6, 9]], [[7, 6, 5]]):
        assert not torch.equal(base, green_list.mask(torch.tensor(changed)))


def test_processor_adds_delta_to_exactly_the_green_logits():
    green_list = GreenList(key(), VOCAB, WatermarkConfig(delta=2.5, context_width=2))
    ids = torch.randint(0, VOCAB, (3, 9))
    scores = torch.randn(3, VOCAB)
    out = GreenListProcessor(green_list)(ids, scores)
    assert torch.allclose(out - scores, 2.5 * py_mask("client-0", 0.25, ids[:, -2:].tolist(), VOCAB).float())


def test_exact_p_value_matches_a_hand_computed_binomial_tail():
    def tail(k, n, p):
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))

    for green, scored, gamma in [(8, 10, 0.25), (30, 60, 0.25), (61, 100, 0.5), (0, 10, 0.25), (10, 10, 0.1)]:
        assert binomial_test(green, scored, gamma).p_value == pytest.approx(tail(green, scored, gamma), rel=1e-9)
    far = binomial_test(60, 100, 0.25)  # z = 8.1: the normal tail would be off by orders of magnitude
    assert far.p_value == pytest.approx(tail(60, 100, 0.25), rel=1e-9)
    assert far.z == pytest.approx((60 - 25) / math.sqrt(100 * 0.25 * 0.75))


@pytest.fixture(scope="module")
def generations(teacher_a):
    prompts = [i.prompt for i in reference_task().query_pool[:256]]
    sampling = Sampling(temperature=1.0, seed=0, max_new_tokens=48)
    watermarked = Watermark(teacher_a, MASTER, WatermarkConfig(delta=2.0), client="client-7").complete(prompts, sampling)
    plain = teacher_a.complete(prompts, sampling)
    prompt_ids = [teacher_a.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return prompts, prompt_ids, watermarked, plain


def test_watermarked_generations_are_greener_than_plain_ones(teacher_a, generations):
    prompts, prompt_ids, watermarked, plain = generations
    detector = WatermarkDetector(GreenList(key("client-7"), len(teacher_a.tokenizer)))
    lengths = [len(p) for p in prompt_ids]
    marked = detector.detect_corpus([p + c.token_ids for p, c in zip(prompt_ids, watermarked)], lengths)
    clean = detector.detect_corpus([p + c.token_ids for p, c in zip(prompt_ids, plain)], lengths)
    assert marked.p_value < 1e-6 and marked.green_fraction > 0.3
    assert clean.p_value > 1e-3  # the teacher's own text is not accused
    # two independent proportions: the difference is many standard errors wide
    se = math.sqrt(0.25 * 0.75 * (1 / marked.scored + 1 / clean.scored))
    assert marked.green_fraction - clean.green_fraction > 4 * se


def test_logprobs_of_a_watermarked_teacher_are_the_watermarked_distribution(teacher_a):
    """Reported logprobs are log_softmax(model logits + delta on the context's green tokens), recomputed
    here from the model's raw logits and the plain-Python green list."""
    prompt, delta, k = reference_task().query_pool[0].prompt, 4.0, 5
    wm = Watermark(teacher_a, MASTER, WatermarkConfig(delta=delta), client="client-0")
    marked = wm.complete([prompt], Sampling(temperature=0, logprobs=k, max_new_tokens=8))[0]
    prompt_ids = teacher_a.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + marked.token_ids
    with torch.no_grad():
        logits = teacher_a.model(torch.tensor([ids])).logits[0, len(prompt_ids) - 1: -1]
    assert logits.shape[-1] == len(teacher_a.tokenizer)
    contexts = [[t] for t in ids[len(prompt_ids) - 1: -1]]  # h = 1: each step's green list follows the token before
    watermarked = (logits + delta * py_mask("client-0", 0.25, contexts, logits.shape[-1])).log_softmax(-1)
    assert len(marked.logprobs) == len(marked.token_logprobs) == len(marked.token_ids) > 0
    for step, (top, chosen, token) in enumerate(zip(marked.logprobs, marked.token_logprobs, marked.token_ids)):
        values, indices = watermarked[step].topk(k)
        assert [t.id for t in top] == indices.tolist()
        assert [t.logprob for t in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert chosen.id == token and chosen.logprob == pytest.approx(watermarked[step, token].item(), abs=1e-4)
    plain = logits.log_softmax(-1)[torch.arange(len(marked.token_ids)), marked.token_ids]
    assert max(abs(c.logprob - p) for c, p in zip(marked.token_logprobs, plain.tolist())) > 0.1


def test_each_account_is_served_under_its_own_key_within_one_batch(teacher_a):
    """Per-account keys: one batch from two accounts comes back with each account's watermark, and the
    Holm-corrected detector names the right account for each half."""
    prompts = [i.prompt for i in reference_task().query_pool[:384]]
    callers = [Caller("alice" if n % 2 else "bob") for n in range(len(prompts))]
    served = Watermark(teacher_a, MASTER, WatermarkConfig(delta=4.0)).complete(
        prompts, Sampling(temperature=1.0, seed=3, max_new_tokens=48), callers)
    for account in ("alice", "bob"):
        mine = [(p, c) for p, c, who in zip(prompts, served, callers) if who.account == account]
        prompt_ids = [teacher_a.tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in mine]
        sequences = [ids + c.token_ids for ids, (_, c) in zip(prompt_ids, mine)]
        detections = {who: WatermarkDetector(GreenList(key(who), VOCAB)).detect_corpus(
            sequences, [len(ids) for ids in prompt_ids]) for who in ("alice", "bob", "carol")}
        assert name_client(detections, 1e-3)["client"] == account


def test_a_repeated_sentence_raises_no_score(teacher_a):
    detector = WatermarkDetector(GreenList(key(), VOCAB), tokenizer=teacher_a.tokenizer)
    sentence = "Bobuk calls Peors a friend. "
    once, thrice = detector.detect_texts([sentence, sentence * 3])
    # the copies add only the seam between them (and the first word as tokenized after a space)
    assert thrice.scored <= once.scored + 2 and thrice.green <= once.green + 2
    raw_once, raw_thrice = WatermarkDetector(GreenList(key(), VOCAB), dedup=False,
                                             tokenizer=teacher_a.tokenizer).detect_texts([sentence, sentence * 3])
    assert raw_thrice.scored >= 2.5 * raw_once.scored  # without dedup every copy counts again


def test_the_prompt_is_never_scored():
    green_list = GreenList(key(), VOCAB)
    prompt = [1]
    while len(prompt) < 300:  # a prompt made only of green tokens
        mask = green_list.mask(torch.tensor([[prompt[-1]]]))[0]
        prompt.append(int(torch.nonzero(mask)[len(prompt) % 50]))
    completion = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    detector = WatermarkDetector(green_list)
    with_prompt = detector.detect([prompt + completion])[0]
    excluded = detector.detect([prompt + completion], prompt_lengths=[len(prompt)])[0]
    assert with_prompt.p_value < 1e-30
    assert excluded.scored <= 200 and excluded.p_value > 1e-3
    again = detector.detect([[3] * 298 + prompt[-2:] + completion], prompt_lengths=[300])[0]
    assert (again.scored, again.green) == (excluded.scored, excluded.green)


def test_holm_names_the_leaking_client_among_24_and_wrong_keys_stay_quiet(teacher_a, generations):
    prompts, prompt_ids, watermarked, _ = generations
    lengths = [len(p) for p in prompt_ids]
    sequences = [p + c.token_ids for p, c in zip(prompt_ids, watermarked)]
    detections = {f"client-{i}": WatermarkDetector(GreenList(key(f"client-{i}"), VOCAB)).detect_corpus(sequences, lengths)
                  for i in range(24)}
    verdict = name_client(detections, alpha=1e-3)
    assert verdict["client"] == "client-7"
    assert min(p for c, p in verdict["adjusted_p"].items() if c != "client-7") > 0.01


def test_holm_adjustment_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.5]).tolist() == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_wrong_key_p_values_are_uniform(teacher_a, generations):
    """200 keys that did not watermark the text: their p-values follow the null. Discrete binomial tails
    are conservative, so the test is one-sided: too many small p-values would fail it."""
    _, prompt_ids, watermarked, _ = generations
    sequences = [p + c.token_ids for p, c in zip(prompt_ids, watermarked)]
    lengths = [len(p) for p in prompt_ids]
    p_values = [WatermarkDetector(GreenList(key(f"wrong-{i}"), VOCAB)).detect_corpus(sequences, lengths).p_value
                for i in range(200)]
    assert kstest(p_values, "uniform", alternative="greater").pvalue > 1e-3
    assert min(holm(p_values)) > 0.01


def test_keys_never_appear_in_reprs_or_audit_reports():
    secret = b"k" * 32
    wm_key = WatermarkKey(secret, label="acct-9")
    assert "kkkk" not in repr(wm_key) and "kkkk" not in repr(GreenList(wm_key, VOCAB))
    report = audit(np.array([[1], [2]]), np.array([3, 4]), [wm_key], VOCAB)
    text = json.dumps(report)
    assert secret.hex() not in text and "kkkk" not in text and wm_key.fingerprint in text
    with pytest.raises(ValueError, match="16 bytes"):
        WatermarkKey(b"short")
    with pytest.raises(ValueError, match="outside the watermark's vocabulary"):
        audit(np.array([[1]]), np.array([VOCAB + 5]), [wm_key], VOCAB)


@pytest.mark.parametrize("bad", [dict(gamma=0), dict(gamma=1), dict(delta=-1), dict(context_width=5),
                                 dict(context_width=0)])
def test_bad_watermark_settings_are_refused(bad):
    with pytest.raises(ValueError):
        WatermarkConfig(**bad)


def test_watermark_needs_a_local_model():
    with pytest.raises(TypeError, match="HFTeacher"):
        Watermark(OpenAITeacher("http://127.0.0.1:9/v1", "m"), MASTER)


def test_sampling_mode_scores_only_what_the_suspect_writes_and_the_logged_filter(teacher_a, generations):
    prompts, prompt_ids, watermarked, _ = generations
    suspect = Watermark(teacher_a, MASTER, WatermarkConfig(delta=2.0), client="client-7")  # writes with the watermark itself
    windows, tokens = sampled_tuples(suspect, prompts[:128], teacher_a.tokenizer, 1,
                                     Sampling(temperature=1.0, seed=5, max_new_tokens=48))
    assert audit(windows, tokens, [key("client-7"), key("client-8")], VOCAB)["client"] == "client-7"
    logged = logged_windows([p + c.token_ids for p, c in zip(prompt_ids, watermarked)], [len(p) for p in prompt_ids], 1)
    kept_windows, kept_tokens = restrict_to(windows, tokens, logged)
    assert 0 < len(kept_tokens) < len(tokens)
    assert all(tuple(w) in logged for w in kept_windows.tolist())


def test_the_logged_filter_accuses_no_model_that_merely_writes_the_same_phrases(teacher_a, generations):
    """The unwatermarked teacher writes the phrases the watermarked logs contain; filtering its samples on
    logged (window, token) tuples would keep the green-enriched ones, filtering on windows keeps H0 exact."""
    prompts, prompt_ids, watermarked, _ = generations
    logged_ids = [p + c.token_ids for p, c in zip(prompt_ids, watermarked)]
    logged = logged_windows(logged_ids, [len(p) for p in prompt_ids], 1)
    windows, tokens = sampled_tuples(teacher_a, prompts, teacher_a.tokenizer, 1,
                                     Sampling(temperature=1.0, seed=9, max_new_tokens=48))
    kept_windows, kept_tokens = restrict_to(windows, tokens, logged)
    assert audit(kept_windows, kept_tokens, [key("client-7")], VOCAB)["p"]["client-7"] > 0.01
    # what is kept depends on the windows alone, never on the token, whose green status is the evidence
    shuffled = np.random.default_rng(0).permutation(tokens)
    assert (restrict_to(windows, shuffled, logged)[0] == kept_windows).all()


def test_z_scores_agree_with_transformers_watermark_detector():
    from transformers import GPT2Config, WatermarkDetector as HFWatermarkDetector, WatermarkingConfig

    from watermark.detect import TransformersGreenList

    config = GPT2Config(vocab_size=VOCAB, bos_token_id=VOCAB - 1)
    rng = np.random.default_rng(3)
    sequences = rng.integers(0, VOCAB - 1, size=(8, 120))
    sequences[:, 60:] = sequences[:, :60]  # repeats, so deduplication matters
    green_list = TransformersGreenList(VOCAB, gamma=0.25, hashing_key=12345)
    for dedup in (False, True):
        theirs = HFWatermarkDetector(config, "cpu", WatermarkingConfig(greenlist_ratio=0.25, hashing_key=12345,
                                                                       seeding_scheme="lefthash", context_width=1),
                                     ignore_repeated_ngrams=dedup)(torch.tensor(sequences), return_dict=True)
        ours = WatermarkDetector(green_list, dedup=dedup).detect(sequences.tolist())
        assert np.allclose([d.z for d in ours], theirs.z_score, atol=1e-9, rtol=0)
        assert [d.scored for d in ours] == theirs.num_tokens_scored.tolist()


@pytest.mark.slow
def test_end_to_end_a_student_distilled_from_the_watermarked_teacher_is_caught(radioactivity_example, tmp_path):
    """A real harvest from watermarked teacher-a (500 greedy queries), a real student (both made once for the
    session by examples/auditor_radioactivity.py, whose test checks the example's own audit of them), then the audit CLI
    in reading mode over the account's logged outputs: the attacker's account is named among 12, and
    teacher-b (never trained on these outputs) is not accused."""
    import subprocess
    import sys

    cell = radioactivity_example[1] / "runs" / "watermark-naive-sft-b500-s0"
    keys_file = tmp_path / "clients.txt"
    keys_file.write_text("\n".join(["attacker"] + [f"client-{i:02d}" for i in range(1, 12)]) + "\n")

    def audit_cli(suspect):
        out = tmp_path / f"audit-{suspect.name}.json"
        subprocess.run([sys.executable, "-m", "guard.cli", "audit", "radioactivity", "--suspect", str(suspect),
                        "--keys-file", str(keys_file), "--lab-key", "--texts", str(cell), "--out", str(out)],
                       check=True, capture_output=True, text=True, timeout=600)
        return json.loads(out.read_text())

    caught = audit_cli(cell / "student")
    assert caught["client"] == "attacker" and caught["p"]["attacker"] < 1e-4, caught["detections"]["attacker"]
    control = audit_cli(MODELS_DIR / "teacher-b")
    assert control["client"] is None and min(control["adjusted_p"].values()) > 0.01


def test_fast_row_dedup_equals_numpy_unique_on_both_paths():
    from watermark.detect import unique_rows

    rng = np.random.default_rng(0)
    for high in (50, 2**40):  # packs into one int64 / falls back to np.unique(axis=0)
        rows = rng.integers(0, high, size=(5000, 3))
        rows[2500:] = rows[:2500]
        ours = unique_rows(rows)
        assert np.array_equal(ours[np.lexsort(ours.T[::-1])], np.unique(rows, axis=0))


@pytest.mark.parametrize("vocab,width", [(VOCAB, 1), (30522, 4)])  # packed fast path / np.unique fallback
def test_per_text_dedup_counts_match_a_plain_python_count(vocab, width):
    green_list = GreenList(key(), vocab, WatermarkConfig(context_width=width))
    rng = np.random.default_rng(1)
    sequences = [list(rng.integers(0, 40, size=n)) for n in (3, 50, 200, 120)]  # a small alphabet: many repeats
    prompts = [0, 10, 30, 200]
    ours = WatermarkDetector(green_list).detect(sequences, prompts)
    for seq, start, got in zip(sequences, prompts, ours):
        tuples = {(tuple(seq[i - width:i]), seq[i]) for i in range(max(start, width), len(seq))}
        green = sum(py_green("client-0", 0.25, list(w), t) for w, t in tuples)
        assert (got.scored, got.green) == (len(tuples), green)


@pytest.mark.slow
def test_watermark_study_smoke_at_toy_scale(tmp_path, monkeypatch):
    """Smoke test of the validation study's whole pipeline (students, four audits each, wrong keys, FPR,
    utility) on toy budgets; its numbers come from `distill-guard study watermark` at full scale."""
    import eval.watermark_study as study
    from eval.watermark_study import GROUPS, main

    def small_task():
        """The plumbing, not the numbers: 40 held-out items (not 600) and 400 pool questions (not 4,200), so that
        five students' grading, the reading audits of unwatermarked text and utility take seconds, not a minute."""
        task = reference_task()
        task.eval_items, task.query_pool = task.eval_items[:40], task.query_pool[:400]
        return task

    monkeypatch.setattr(study, "reference_task", small_task)
    report = main(str(tmp_path), [48], 1, 1, steps=5, pool_prompts=32, documents=5, progress=False)
    assert [s["group"] for s in report["students"]] == [g[0] for g in GROUPS]
    for student in report["students"]:
        assert set(student["audits"]) == {"reading/unwatermarked", "reading/logged", "reading/fresh", "sampling",
                                         "sampling/logged-windows"}
        assert all(0 <= a["p_attacker"] <= 1 for a in student["audits"].values())
    assert report["wrong_keys"]["keys"] == 200 and 0 <= report["wrong_keys"]["ks_p"] <= 1
    assert report["false_positives"]["human prose (WordPiece, 200 tokens)"]["texts"] == 25
    assert report["utility"]["plain"]["accuracy"] > 0.9
    assert (tmp_path / "report.md").read_text().startswith("| group |")


@pytest.mark.parametrize("width", [1, 2])
def test_the_processor_adds_delta_exactly_on_each_rows_green_list(width):
    green_list = GreenList(key(), VOCAB, WatermarkConfig(context_width=width, delta=1.5))
    input_ids = torch.randint(0, VOCAB, (6, 5), generator=torch.Generator().manual_seed(1))
    scores = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(2))
    biased = GreenListProcessor(green_list)(input_ids, scores.clone())
    expected = scores + 1.5 * py_mask("client-0", 0.25, input_ids[:, -width:].tolist(), VOCAB).float()
    assert torch.equal(biased, expected)


def test_watermark_speed_benchmark_smoke_on_the_reference_vocabulary():
    """Smoke test of the speed benchmark at toy size: its three detectors run on the same sequences, count
    the same tuples, and on transformers' green lists ours gives transformers' z-scores exactly."""
    from eval.benchmarks.watermark_speed import VOCABULARIES, detection

    out = detection(VOCABULARIES[0].load(), tokens=2048, rounds=1)
    assert out["tokens"] == 8 * 256 and out["vocab"] == VOCAB
    assert out["max_abs_z_difference_transformers_lists"] == 0.0
    assert set(out["median_seconds"]) == {"transformers", "ours_keyed", "ours_transformers_lists"}


def test_green_lists_tabulated_block_by_block_equal_the_pointwise_hash():
    from watermark.kgw import TABLE_CHUNK, TABLE_VOCAB_LIMIT

    vocab = 3000  # tabulated in several blocks of rows, the last one partial
    assert TABLE_CHUNK < vocab * vocab and vocab <= TABLE_VOCAB_LIMIT and vocab % (TABLE_CHUNK // vocab)
    green_list = GreenList(key(), vocab)
    contexts = torch.arange(vocab)
    rows = green_list.mask(contexts[:, None])
    pointwise = green_list.green(contexts.repeat_interleave(vocab)[:, None], torch.arange(vocab).repeat(vocab))
    assert torch.equal(rows.reshape(-1), pointwise)


def test_transformers_green_list_mask_is_what_transformers_processor_biases():
    from transformers.generation.logits_process import WatermarkLogitsProcessor

    from watermark.detect import TransformersGreenList

    input_ids = torch.randint(0, VOCAB, (6, 7), generator=torch.Generator().manual_seed(4))
    processor = WatermarkLogitsProcessor(VOCAB, "cpu", greenlist_ratio=0.25, bias=1.0, hashing_key=12345,
                                         seeding_scheme="lefthash", context_width=1)
    biased = processor(input_ids, torch.zeros(6, VOCAB)) > 0
    assert torch.equal(TransformersGreenList(VOCAB, 0.25, 12345).mask(input_ids[:, -1:]), biased)
