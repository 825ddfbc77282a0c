import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.metrics import capability, response_entropy_bits
from eval.reference import MODELS_DIR, TEACHERS
from eval.reference.build import phrasing_distance
from eval.reference.world import (FACT_TEMPLATES, Style, World, one_hop_items, parse_facts, reference_task,
                                  reference_world, split_world)
from guard.teacher import Sampling


def test_world_is_deterministic_by_seed():
    assert World(seed=5).facts == World(seed=5).facts
    assert World(seed=5).facts != World(seed=6).facts
    a = [World(seed=5).render(q, Style(1), np.random.default_rng(0)) for q in World(seed=5).two_hop_questions()[:50]]
    b = [World(seed=5).render(q, Style(1), np.random.default_rng(0)) for q in World(seed=5).two_hop_questions()[:50]]
    assert a == b


def test_every_reasoning_step_is_checkable():
    world, rng = reference_world(), np.random.default_rng(0)
    for q in world.two_hop_questions()[::7]:
        text = world.render(q, Style(seed=9), rng)
        assert parse_facts(text.split("\n")[0]) == world.chain(q), text


def test_every_template_is_parsed_as_its_own_fact_type():
    for kind, templates in FACT_TEMPLATES.items():
        for template in templates:
            assert parse_facts(template.format(x="Kalon", v="Ridan")) == [("Kalon", kind, "Ridan")], template


def test_split_keeps_evaluation_items_out_of_teacher_and_attacker_data():
    world = reference_world()
    split = split_world(world)
    held = set(split.held_out)
    assert len(held) == 600
    assert not held & set(split.teacher_two_hop) and not held & set(split.attacker_pool)
    task = reference_task(world)
    assert len(task.eval_items) == 600 and len(task.query_pool) == 1200 + 3000
    assert all(len(q.hops) == 2 for q in split.held_out)


@pytest.mark.parametrize("name", TEACHERS)
def test_shipped_checkpoints_load_with_auto_classes_and_are_small(name):
    path = MODELS_DIR / name
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "gpt2" and tokenizer.eos_token == "<|endoftext|>"
    assert sum(f.stat().st_size for f in path.iterdir()) <= 10 * 2**20


# The accuracy targets are properties of the fixed held-out set (600 2-hop items, all of them) and of
# every one of the 1,200 1-hop facts, under deterministic greedy decoding; the test measures the whole
# population rather than a sample, so no sampling error enters the comparison with the target.
@pytest.mark.parametrize("name", TEACHERS)
def test_shipped_teachers_meet_accuracy_targets(name, request):
    teacher = request.getfixturevalue(name.replace("-", "_"))
    task = reference_task()
    two_hop, _ = capability(teacher, task)
    one_hop, _ = capability(teacher, task, one_hop_items())
    assert two_hop.total == 600 and one_hop.total == 1200
    assert two_hop.value >= 0.93, two_hop
    assert one_hop.value >= 0.98, one_hop


def test_sampled_answers_carry_at_least_8_bits(teacher_a):
    task = reference_task()
    prompts = [i.prompt for i in task.eval_items[:200]] + [i.prompt for i in one_hop_items()[::12]]
    bits = response_entropy_bits(teacher_a, prompts, seed=1)
    # One-sided: the mean minus three standard errors must clear 8 bits.
    assert bits.mean() - 3 * bits.std(ddof=1) / np.sqrt(len(bits)) >= 8.0, bits.mean()


def test_teachers_differ_in_phrasing_beyond_sampling_noise(teacher_a, teacher_b):
    prompts = [i.prompt for i in reference_task().query_pool[::8]]
    a = [c.text for c in teacher_a.complete(prompts, Sampling(seed=0))]
    a_again = [c.text for c in teacher_a.complete(prompts, Sampling(seed=1))]
    b = [c.text for c in teacher_b.complete(prompts, Sampling(seed=0))]
    between, within = phrasing_distance(a, b), phrasing_distance(a, a_again)
    assert between["p_value"] < 1e-6
    assert within["p_value"] > 1e-3
    assert between["mean_tv"] > 2 * within["mean_tv"]


def test_teacher_build_is_deterministic_by_seed(tmp_path):
    from eval.reference.build import TeacherRecipe, build_tokenizer, train_teacher

    world = reference_world()
    tokenizer = build_tokenizer(world)
    assert build_tokenizer(world).get_vocab() == tokenizer.get_vocab()
    recipe = TeacherRecipe("tiny", seed=3, style_seed=4, steps=12, batch_size=16)
    first = train_teacher(recipe, tokenizer, tmp_path / "one", world, measure=False)
    second = train_teacher(recipe, tokenizer, tmp_path / "two", world, measure=False)
    assert first["final_loss"] == second["final_loss"]
    assert (tmp_path / "one/model.safetensors").read_bytes() == (tmp_path / "two/model.safetensors").read_bytes()
    train_teacher(TeacherRecipe("tiny", seed=5, style_seed=4, steps=12, batch_size=16), tokenizer,
                  tmp_path / "three", world, measure=False)
    assert (tmp_path / "three/model.safetensors").read_bytes() != (tmp_path / "one/model.safetensors").read_bytes()
