import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from eval.reference import MODELS_DIR
from eval.reference.world import reference_task
from eval.reference import load_teacher
from guard.hf_teacher import HFTeacher, load_causal_lm
from guard.teacher import GREEDY, ModelLoadError, Sampling

# Prompts of different lengths, so the batch needs left padding.
PROMPTS = [i.prompt for i in reference_task().eval_items[:6]] + ["question: who is the boss of Kaloth?\n"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A randomly initialised Llama-architecture model saved to disk with the reference tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(MODELS_DIR / "student")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_at_a_time(teacher, prompts, sampling):
    return [teacher.complete([p], sampling)[0] for p in prompts]


def test_prompts_really_need_padding(teacher_a):
    lengths = {len(teacher_a.tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) > 1


def test_left_padded_batch_equals_unpadded_gpt2(teacher_a):
    batched = teacher_a.complete(PROMPTS, GREEDY)
    single = one_at_a_time(teacher_a, PROMPTS, GREEDY)
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert all(c.finish_reason == "stop" and c.answer for c in batched)


def test_left_padded_batch_equals_unpadded_llama(tiny_llama):
    teacher = HFTeacher(tiny_llama)
    assert teacher.model.config.model_type == "llama"
    sampling = Sampling(temperature=0.0, max_new_tokens=12)
    batched = teacher.complete(PROMPTS, sampling)
    single = one_at_a_time(teacher, PROMPTS, sampling)
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert len({tuple(c.token_ids) for c in batched}) > 1  # not a degenerate constant output


def test_top_k_logprobs_match_a_softmax_by_hand(teacher_a):
    k = 5
    completion = teacher_a.complete(PROMPTS[:3], Sampling(temperature=1.0, seed=7, logprobs=k))[1]
    prompt_ids = teacher_a.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion.token_ids])
    with torch.no_grad():
        logits = teacher_a.model(ids).logits[0, len(prompt_ids) - 1: -1]
    by_hand = logits - logits.exp().sum(-1, keepdim=True).log()
    assert len(completion.logprobs) == len(completion.token_ids) > 0
    for step, (top, sampled, token) in enumerate(zip(completion.logprobs, completion.token_logprobs,
                                                     completion.token_ids)):
        values, indices = by_hand[step].topk(k)
        assert [t.id for t in top] == indices.tolist()
        assert [t.logprob for t in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert sampled.id == token and sampled.logprob == pytest.approx(by_hand[step, token].item(), abs=1e-4)
        assert top[0].token == teacher_a.tokenizer.decode([top[0].id])


def test_seeded_sampling_is_reproducible(teacher_a):
    a = teacher_a.complete(PROMPTS, Sampling(seed=3))
    b = teacher_a.complete(PROMPTS, Sampling(seed=3))
    c = teacher_a.complete(PROMPTS, Sampling(seed=4))
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.text for x in a] != [x.text for x in c]


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickled_checkpoints_are_refused(tmp_path, tiny_llama, name):
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    # A pickle that would create a file if it were ever unpickled.
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(ModelLoadError, match="refusing pickled weights"):
        load_causal_lm(tmp_path)
    assert not marker.exists()


def test_remote_code_is_never_trusted(tmp_path, tiny_llama):
    """A valid checkpoint whose auto_map names code shipped beside it loads with the built-in class;
    the shipped module, which would leave a marker file on import, is never imported."""
    for f in tiny_llama.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    (tmp_path / "modeling_evil.py").write_text(
        f"from transformers import LlamaForCausalLM as EvilForCausalLM\n"
        f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))

    model, _ = load_causal_lm(tmp_path)
    assert type(model) is LlamaForCausalLM
    assert HFTeacher(tmp_path).complete(["question: who is the boss of Kaloth?\n"], GREEDY)
    assert not marker.exists()


def test_unknown_model_type_and_missing_dir_fail_clearly(tmp_path, tiny_llama):
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_causal_lm(tmp_path / "absent")
    for f in tiny_llama.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no-such-architecture"):
        load_causal_lm(tmp_path)


def test_load_teacher_specs():
    assert load_teacher("reference").name == "teacher-a"
    assert load_teacher("reference:teacher-b").name == "teacher-b"
    with pytest.raises(ValueError, match="unknown reference teacher"):
        load_teacher("reference:teacher-z")
    assert load_teacher("http://127.0.0.1:9/v1", model="m").name == "m"
