"""Redaction policies on crafted completions, sealed reasoning, streaming, and the defended teacher served."""

import base64
import copy
import random

import openai
import pytest

from eval.reference import plan_or_outline
from eval.reference.world import reference_task
from guard.defenses import DefenseParts, build_defense
from guard.prompts import Conversation
from guard.reasoning import split_reasoning
from guard.redaction import (AnswerOnly, Full, Policy, Redact, Sealed, SealError, Sealer, StreamRedactor, Summary,
                             TeacherSummarizer, Truncate, outline, parse_policy)
from guard.gateway.app import create_app
from guard.teacher import GREEDY
from conftest import live_server

PROMPT = "question: what does the friend of Bobuk do for a living?\n"
REFERENCE = "thinking it through. Bobuk calls Peors a friend. and Peors is a plumber. that settles it.\nanswer: plumber"

# (name, completion, the answer a client must see, secrets no withholding policy may show)
CASES = [
    ("reference", REFERENCE, "plumber", ["Peors a friend", "settles"]),
    ("think", "<think>s1 s2 s3 s4 s5 s6 SECRET7 SECRET8</think>\n42", "42", ["SECRET7", "SECRET8"]),
    ("hashes", "s1 s2 s3 s4 s5 s6 SECRET7 SECRET8\n#### 42", "42", ["SECRET7"]),
    ("unclosed", "visible <think>s1 s2 s3 s4 s5 s6 SECRET7 SECRET8", "visible", ["SECRET7", "SECRET8"]),
    ("nested", "<think>s1 s2 s3 s4 s5 s6 <think>SECRET7</think> SECRET8</think> 42", "42", ["SECRET7", "SECRET8"]),
    ("between-blocks", "<think>s1 s2 s3 s4 s5 s6</think> SECRET7 <think>SECRET8</think> 42", "42",
     ["SECRET7", "SECRET8"]),
    ("reasoning-only", "<think>s1 s2 s3 s4 s5 s6 SECRET7 SECRET8</think>", "", ["SECRET7", "SECRET8"]),
    ("unclosed-only", "<think>s1 s2 s3 s4 s5 s6 SECRET7", "", ["SECRET7"]),
    ("stray-close", "s1 s2 s3 s4 s5 s6 SECRET7</think>42", "42", ["SECRET7"]),
]
WITHHOLDING = [AnswerOnly(), Summary(), Truncate(6), Sealed(Sealer.generate())]


@pytest.mark.parametrize("policy", WITHHOLDING, ids=lambda p: p.name)
@pytest.mark.parametrize("name,text,answer,secrets", CASES, ids=[c[0] for c in CASES])
def test_withholding_policies_keep_the_answer_and_never_show_hidden_reasoning(policy, name, text, answer, secrets):
    shown = policy.redact([PROMPT], [text])[0].text
    assert split_reasoning(shown)[1] == answer
    for secret in secrets:
        assert secret not in shown, f"{policy.name} leaked {secret!r} from {name}: {shown!r}"


def unmarked(policy: Policy) -> Policy:
    """`policy` for a model that marks no reasoning (a plain chat model), as `parse_policy(..., marked=False)`."""
    policy = copy.copy(policy)
    policy.marked = False
    return policy


@pytest.mark.parametrize("policy", [Full(), *WITHHOLDING], ids=lambda p: p.name)
@pytest.mark.parametrize("text", ["just an answer, no reasoning", "42", "", "answer is plumber"])
def test_finished_unmarked_text_of_a_model_that_marks_nothing_passes_through_unchanged(policy, text):
    redacted = unmarked(policy).redact([PROMPT], [text])[0]
    assert redacted.text == text and redacted.sealed is None


@pytest.mark.parametrize("policy", WITHHOLDING, ids=lambda p: p.name)
def test_unmarked_text_of_a_model_that_marks_its_reasoning_is_all_reasoning(policy):
    """Fails open if a withholding policy serves a marker-less completion whole: a harvester that makes the
    model drop its marker (or a model that forgot it) would read the reasoning."""
    text = "thinking it through. Bobuk calls Peors a friend. and Peors is a plumber. that settles it."
    assert policy.marked and parse_policy("answer-only").marked  # the default fails closed
    shown = policy.redact([PROMPT], [text])[0].text
    assert "Peors a friend" not in shown and "Peors is a plumber" not in shown, shown


@pytest.mark.parametrize("policy", WITHHOLDING, ids=lambda p: p.name)
@pytest.mark.parametrize("marked", [True, False])
def test_a_completion_cut_before_its_marker_is_all_reasoning_at_every_length(policy, marked):
    """Every prefix of a completion, as `max_tokens` would cut it, shows no more of the reasoning than the
    whole completion does under the same policy, and no answer it has not finished."""
    policy = policy if marked else unmarked(policy)
    shown_whole = policy.redact_one(PROMPT, REFERENCE).text
    for end in range(1, len(REFERENCE)):
        cut = REFERENCE[:end]
        shown = policy.redact([PROMPT], [cut], [True])[0].text
        for fact in ("Peors a friend", "Peors is a plumber", "settles"):
            assert fact not in shown, (policy.name, cut, shown)
        assert len(shown.split()) <= len(shown_whole.split()), (policy.name, cut, shown)
        assert ("answer:" in shown) <= ("\nanswer:" in cut), (policy.name, cut, shown)


def test_empty_think_block_leaves_just_the_answer():
    for policy in WITHHOLDING:
        assert policy.redact([PROMPT], ["<think></think>42"])[0].text == "42"
    assert Full().redact([PROMPT], ["<think></think>42"])[0].text == "<think></think>42"


def test_answer_only_and_full_on_the_reference_format():
    assert AnswerOnly().redact_one(PROMPT, REFERENCE).text == "answer: plumber"
    assert Full().redact_one(PROMPT, REFERENCE).text == REFERENCE


def test_truncate_keeps_exactly_the_first_k_words_of_reasoning():
    assert Truncate(4).redact_one(PROMPT, REFERENCE).text == "thinking it through. Bobuk …\nanswer: plumber"
    assert Truncate(8).redact_one(PROMPT, REFERENCE).text == ("thinking it through. Bobuk calls Peors a friend. …\n"
                                                              "answer: plumber")
    think = Truncate(2).redact_one(PROMPT, "<think>a b c</think>\n42").text
    assert think == "<think>a b …</think>\n42"
    short = "<think>a b</think>\n42"
    assert Truncate(2).redact_one(PROMPT, short).text == short  # nothing cut, no ellipsis
    assert Truncate(6).redact_one(PROMPT, "<think>s1 s2 s3 s4 s5 s6 SECRET7").text == "<think>s1 s2 s3 s4 s5 s6 …</think>\n"


@pytest.mark.parametrize("spec", ["truncate:0", "truncate:-3", "truncate:x", "truncate:", "redact-all"])
def test_bad_policy_names_are_refused_with_the_choices(spec):
    with pytest.raises(ValueError, match="truncate|choose one of"):
        parse_policy(spec)
    with pytest.raises(ValueError):
        build_defense(spec, None)


def test_reference_summary_states_the_plan_without_any_intermediate_fact(teacher_a):
    items = [i for i in reference_task().eval_items if "of the" in i.prompt][:50]  # relation-then-relation chains
    for item, completion in zip(items, teacher_a.complete([i.prompt for i in items], GREEDY)):
        summary, answer = split_reasoning(Summary(plan_or_outline).redact_one(item.prompt, completion.text).text)
        assert summary.startswith("plan: look up the ") and ", then " in summary
        people = {w.strip(".") for w in completion.reasoning.split() if w[:1].isupper()}
        people -= {w.strip("?\n") for w in item.prompt.split()}
        assert people and not any(p in summary for p in people), (summary, people)  # no bridge, no answer
        assert answer == completion.answer


def test_summary_falls_back_to_an_outline_and_takes_any_summariser():
    text = "<think>First A. Then B. Finally C.</think>42"
    assert Summary().redact_one("some other task", text).text == "<think>(reasoned in 3 steps; details withheld)</think>\n42"
    assert outline(["p"], ["one step"]) == ["(reasoned in 1 steps; details withheld)"]
    seen = []

    def summarise(prompts, reasonings):
        seen.append((prompts, reasonings))
        return [f"{len(r)} chars" for r in reasonings]

    out = unmarked(Summary(summarise)).redact(["p1", "p2", "p3"], [text, "no reasoning here", REFERENCE])
    assert seen == [(["p1", "p3"], ["First A. Then B. Finally C.", REFERENCE.split("\n")[0]])]  # one batched call
    assert [o.text for o in out] == ["<think>27 chars</think>\n42", "no reasoning here", "89 chars\nanswer: plumber"]


def test_a_model_can_write_the_summary(teacher_b):
    summarizer = TeacherSummarizer(teacher_b)
    text = "<think>First A. Then B.</think>42"
    redacted = Summary(summarizer).redact_one(PROMPT, text).text
    asked = summarizer.instruction.format(prompt=PROMPT.strip(), reasoning="First A. Then B.")
    expected = teacher_b.complete([asked], GREEDY)[0].answer.strip()
    assert redacted == (f"<think>{expected}</think>\n42" if expected else "42")


def test_sealed_reasoning_round_trips_only_with_the_right_key_and_prompt():
    sealer = Sealer.generate()
    redacted = Sealed(sealer).redact_one(PROMPT, REFERENCE)
    assert redacted.text == "answer: plumber" and "Peors" not in redacted.sealed
    assert sealer.open(redacted.sealed, PROMPT) == REFERENCE.split("\n")[0]
    with pytest.raises(SealError, match="authentication"):
        Sealer.generate().open(redacted.sealed, PROMPT)  # another provider's key
    with pytest.raises(SealError, match="authentication"):
        sealer.open(redacted.sealed, "question: who is the boss of Bobuk?\n")  # replayed into another conversation
    assert Sealed(sealer).redact_one(PROMPT, REFERENCE).sealed != redacted.sealed  # fresh nonce each time


def test_every_single_bit_flip_of_a_sealed_blob_is_refused():
    sealer = Sealer.generate()
    blob = sealer.seal("Bobuk calls Peors a friend.", PROMPT)
    raw = bytearray(base64.urlsafe_b64decode(blob[len(Sealer.PREFIX):]))
    for i in range(len(raw)):
        for bit in (0, 7):
            tampered = raw.copy()
            tampered[i] ^= 1 << bit
            with pytest.raises(SealError):
                sealer.open(Sealer.PREFIX + base64.urlsafe_b64encode(bytes(tampered)).decode(), PROMPT)
    for bad in ["", "dgs1.", "dgs1.@@@", "xyz." + blob[5:], blob[:20]]:
        with pytest.raises(SealError):
            sealer.open(bad, PROMPT)


def test_seal_keys_never_show_in_reprs_or_errors(monkeypatch):
    key = Sealer.new_key()
    monkeypatch.setenv(Sealer.ENV, key)
    sealer = Sealer.from_env(required=True)
    assert key not in repr(sealer) and key not in repr(Sealed(sealer).sealer)
    blob = sealer.seal("secret", "p")
    assert Sealer.from_env().open(blob, "p") == "secret"  # the same key from the environment opens it
    with pytest.raises(SealError) as err:
        Sealer.generate().open(blob, "p")
    assert key not in str(err.value)
    monkeypatch.setenv(Sealer.ENV, "not-a-key")
    with pytest.raises(SealError, match="base64url"):
        Sealer.from_env()
    monkeypatch.delenv(Sealer.ENV)
    with pytest.raises(SealError, match=Sealer.ENV):
        Sealer.from_env(required=True)


@pytest.mark.parametrize("policy", [Full(), *WITHHOLDING], ids=lambda p: p.name)
def test_streaming_never_emits_what_the_final_redaction_withholds(policy):
    rng = random.Random(0)
    for _, text, _, _ in CASES + [("ref", REFERENCE, "", [])]:
        for _ in range(5):
            cuts = sorted(rng.sample(range(1, len(text)), k=min(4, len(text) - 1)))
            chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            stream = StreamRedactor(policy, PROMPT)
            early = "".join(stream.feed(c) for c in chunks)
            final = policy.redact([PROMPT], [text])[0]
            if not policy.streams:
                assert early == ""  # where the reasoning ends is unknown until the end
            assert early + stream.finish() == final.text
            assert (stream.sealed is None) == (final.sealed is None)


def test_full_streams_as_it_goes():
    stream = StreamRedactor(Full(), PROMPT)
    assert [stream.feed(c) for c in ["<think>a", " b</think>", "42"]] == ["<think>a", " b</think>", "42"]
    assert stream.finish() == ""


def test_defended_teacher_keeps_answers_and_drops_token_level_data(teacher_a):
    items = reference_task().eval_items[:64]
    prompts = [i.prompt for i in items]
    plain = teacher_a.complete(prompts, GREEDY)
    sealer = Sealer.generate()
    parts = DefenseParts(sealer=sealer)
    for spec in ["answer-only", "summary", "truncate:4", "sealed"]:
        defended = build_defense(spec, teacher_a, parts)
        served = defended.complete(prompts, GREEDY)
        assert [c.answer for c in served] == [c.answer for c in plain]
        assert all(c.token_ids == [] and c.logprobs is None for c in served)  # ids would spell out the hidden text
        assert [c.completion_tokens for c in served] == [len(c.token_ids) for c in plain]  # hidden tokens billed
    sealed = build_defense("sealed", teacher_a, parts)
    for p, c, original in zip(prompts, sealed.complete(prompts, GREEDY), plain):
        assert sealer.open(c.sealed_reasoning, p) == original.reasoning
    assert isinstance(build_defense("full", teacher_a), Redact)
    assert [c.text for c in build_defense("full", teacher_a).complete(prompts, GREEDY)] == [c.text for c in plain]


def test_sealed_server_hands_out_blobs_and_refuses_tampered_ones(teacher_a):
    sealer = Sealer.generate()
    app = create_app(lambda: Redact(teacher_a, Sealed(sealer)), "teacher-a", sealer=sealer)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="teacher-a", temperature=0,
                                               messages=[{"role": "user", "content": PROMPT}])
        message = reply.choices[0].message
        assert message.content == "answer: plumber"
        blob = message.model_extra["sealed_reasoning"]
        assert "Peors" in sealer.open(blob, Conversation(PROMPT, [{"role": "user", "content": PROMPT}]))
        assert reply.usage.completion_tokens > len("answer: plumber".split())  # the hidden tokens are billed

        def follow_up(sealed):
            return client.chat.completions.create(model="teacher-a", temperature=0, messages=[
                {"role": "user", "content": PROMPT},
                {"role": "assistant", "content": message.content, "sealed_reasoning": sealed},
                {"role": "user", "content": "question: who is the boss of Bobuk?\n"}])

        assert follow_up(blob).choices[0].message.content.startswith("answer: ")
        tampered = blob[:-6] + ("A" if blob[-6] != "A" else "B") + blob[-5:]
        with pytest.raises(openai.BadRequestError, match="failed authentication"):
            follow_up(tampered)


def test_redaction_benchmark_smoke():
    """Smoke test: the redaction benchmark still runs every policy as the policies change. Not timed here."""
    from eval.benchmarks.redaction_speed import POLICIES, post_processing

    texts = ["<think>a is b. b is c.</think> answer: c", "no reasoning here", "<think>unclosed"]
    result = post_processing(["q1", "q2", "q3"], texts, repeats=1)
    assert set(result) == set(POLICIES)
    assert all(r["us_per_completion"] > 0 and r["streamed_us_per_completion"] > 0 for r in result.values())
