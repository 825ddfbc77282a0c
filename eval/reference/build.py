"""Rebuild the reference lab: the shared tokenizer, teacher-a, teacher-b and the reference student config;
teacher-llama, a Llama trained with a BOS token in Llama's convention, keeps prompt formatting honest.

    make lab    # both teachers in parallel, one thread each, then the phrasing comparison

or `python -m eval.reference.build [teacher-a] [teacher-b] [teacher-llama]` and `python -m eval.reference.build --compare`.

Deterministic by seed on CPU. Each teacher writes `build_report.json` beside its weights with the
numbers this run measured (accuracy, response entropy, training time).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import chi2, chi2_contingency
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from eval.metrics import capability, response_entropy_bits
from eval.reference import MODELS_DIR
from eval.reference.world import (CLOSERS, CONNECTIVES, FACT_TEMPLATES, OPENERS, Style, World,
                                  format_prompt, one_hop_items, phrasing_counts, reference_task, reference_world,
                                  split_world)
from eval.trainer import TrainConfig, tokenize_pairs, train
from guard.hf_teacher import HFTeacher
from guard.teacher import Sampling

EOS = "<|endoftext|>"
BOS = "<s>"  # teacher-llama's, prepended to every text its tokenizer encodes


@dataclass
class TeacherRecipe:
    name: str
    seed: int  # weight init and data order
    style_seed: int  # phrasing preferences
    steps: int = 4500
    batch_size: int = 64
    lr: float = 2e-3
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    arch: str = "gpt2"  # or "llama": Llama's architecture and its tokenizer convention (a BOS on every text)


RECIPES = {
    "teacher-a": TeacherRecipe("teacher-a", seed=1, style_seed=101),
    "teacher-b": TeacherRecipe("teacher-b", seed=2, style_seed=202),
    "teacher-llama": TeacherRecipe("teacher-llama", seed=3, style_seed=101, steps=2000, arch="llama"),
}
STUDENT = dict(n_layer=4, n_embd=128, n_head=4)


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the world's own text, so every name and word is a few tokens."""
    style, rng = Style(seed=0, sharpness=0.0), np.random.default_rng(0)
    questions = world.one_hop_questions() + world.two_hop_questions()
    corpus = [format_prompt(q.text) + world.render(q, style, rng) for q in questions]
    corpus += list(OPENERS + CONNECTIVES + CLOSERS) + [t for ts in FACT_TEMPLATES.values() for t in ts]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=EOS, model_max_length=128)


def with_bos(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The lab tokenizer in Llama's convention: a BOS token it prepends to every text encoded with special
    tokens, so a model trained on it has seen BOS first in every row."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens([BOS])
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, backend.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS, model_max_length=128)


def llama_model(tokenizer: PreTrainedTokenizerFast, n_layer: int, n_embd: int, n_head: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=n_embd, intermediate_size=4 * n_embd, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_head, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))


def gpt2_config(tokenizer: PreTrainedTokenizerFast, n_layer: int, n_embd: int, n_head: int) -> GPT2Config:
    eos = tokenizer.eos_token_id
    # No dropout: these models must memorise facts, and they are far too small to overfit usefully.
    return GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def teacher_examples(world: World, style: Style, count: int, seed: int) -> tuple[list[str], list[str]]:
    """Half 1-hop facts, half worked 2-hop compositions from the taught part of the split."""
    split = split_world(world)
    one_hop, two_hop = world.one_hop_questions(), split.teacher_two_hop
    rng = np.random.default_rng(seed)
    prompts, completions = [], []
    for _ in range(count):
        pool = one_hop if rng.random() < 0.5 else two_hop
        q = pool[rng.integers(len(pool))]
        prompts.append(format_prompt(q.text))
        completions.append(world.render(q, style, rng))
    return prompts, completions


def train_teacher(recipe: TeacherRecipe, tokenizer: PreTrainedTokenizerFast, out_dir: Path,
                  world: World | None = None, measure: bool = True) -> dict:
    world = world or reference_world()
    torch.manual_seed(recipe.seed)
    if recipe.arch == "llama":
        tokenizer = with_bos(tokenizer)
        model = llama_model(tokenizer, recipe.n_layer, recipe.n_embd, recipe.n_head)
    else:
        model = GPT2LMHeadModel(gpt2_config(tokenizer, recipe.n_layer, recipe.n_embd, recipe.n_head))
    prompts, completions = teacher_examples(world, Style(recipe.style_seed), recipe.steps * recipe.batch_size,
                                            recipe.seed)
    dataset = tokenize_pairs(tokenizer, prompts, completions)
    config = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=100,
                         log_every=max(1, min(100, recipe.steps // 10)),
                         seed=recipe.seed, output_dir=str(Path("runs") / "trainer" / recipe.name))
    result = train(model, tokenizer, dataset, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    report = {"recipe": asdict(recipe), "train_seconds": round(result.seconds, 1),
              "tokens_per_s": round(result.tokens_per_s), "final_loss": result.losses[-1][1] if result.losses else None,
              "parameters": sum(p.numel() for p in model.parameters())}
    if measure:
        report.update(measure_teacher(HFTeacher(out_dir, model=model, tokenizer=tokenizer), world))
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def measure_teacher(teacher: HFTeacher, world: World) -> dict:
    task = reference_task(world)
    two_hop, _ = capability(teacher, task)
    one_hop, _ = capability(teacher, task, one_hop_items(world))
    prompts = [i.prompt for i in task.eval_items[:300]] + [i.prompt for i in one_hop_items(world)[::4]]
    entropy = response_entropy_bits(teacher, prompts, seed=0)
    return {
        "held_out_2hop_accuracy": two_hop.value, "held_out_2hop_n": two_hop.total,
        "held_out_2hop_ci95": two_hop.clopper_pearson(),
        "one_hop_accuracy": one_hop.value, "one_hop_n": one_hop.total,
        "entropy_bits_per_response": {"2hop_mean": float(entropy[:300].mean()), "1hop_mean": float(entropy[300:].mean()),
                                      "all_mean": float(entropy.mean()), "samples": len(entropy)},
    }


def phrasing_distance(texts_a: list[str], texts_b: list[str]) -> dict:
    """Mean total-variation distance between two text sets' phrasing choices, with a chi-square test."""
    counts_a, counts_b = phrasing_counts(texts_a), phrasing_counts(texts_b)
    tv, statistic, dof = {}, 0.0, 0
    for kind in counts_a:
        a, b = counts_a[kind], counts_b[kind]
        tv[kind] = 0.5 * float(np.abs(a / a.sum() - b / b.sum()).sum())
        used = (a + b) > 0
        test = chi2_contingency(np.stack([a[used], b[used]]))
        statistic, dof = statistic + test.statistic, dof + test.dof
    return {"tv_by_fact_type": tv, "mean_tv": float(np.mean(list(tv.values()))),
            "chi2": statistic, "dof": dof, "p_value": float(chi2.sf(statistic, dof))}


def compare_phrasing(models_dir: Path = MODELS_DIR, prompts_count: int = 1500) -> dict:
    """How differently teacher-a and teacher-b phrase the same answers; a second teacher-a sample is the
    noise floor."""
    task = reference_task()
    prompts = [i.prompt for i in (task.eval_items + task.query_pool)[:prompts_count]]
    sampling = Sampling(temperature=1.0, seed=0)
    texts_a = [c.text for c in HFTeacher(models_dir / "teacher-a").complete(prompts, sampling)]
    texts_a2 = [c.text for c in HFTeacher(models_dir / "teacher-a").complete(prompts, Sampling(seed=1))]
    texts_b = [c.text for c in HFTeacher(models_dir / "teacher-b").complete(prompts, sampling)]
    result = {"prompts": len(prompts), "a_vs_b": phrasing_distance(texts_a, texts_b),
              "a_vs_a_resampled": phrasing_distance(texts_a, texts_a2)}
    (models_dir / "phrasing.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def save_student_config(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """The reference student: a config and the shared tokenizer, no weights (attacks start from scratch)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gpt2_config(tokenizer, **STUDENT).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build(names: list[str] | None = None, models_dir: Path = MODELS_DIR) -> dict:
    start = time.perf_counter()
    world = reference_world()
    tokenizer = build_tokenizer(world)
    save_student_config(tokenizer, models_dir / "student")
    reports = {}
    for name in names or list(RECIPES):
        print(f"training {name} ...", flush=True)
        reports[name] = train_teacher(RECIPES[name], tokenizer, models_dir / name, world)
        print(json.dumps(reports[name], indent=2), flush=True)
    print(f"reference lab built in {time.perf_counter() - start:.0f} s")
    return reports


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--compare"]:
        print(json.dumps(compare_phrasing(), indent=2))
    else:
        build(sys.argv[1:] or None)
