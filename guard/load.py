"""A teacher from a spec: an OpenAI-compatible base URL, a pretrained model by name, or a local model directory."""

from __future__ import annotations

from pathlib import Path

from guard.openai_teacher import OpenAITeacher
from guard.pretrained import PRETRAINED, model_dir
from guard.teacher import Teacher


def is_remote(spec: str | Path) -> bool:
    """Whether `spec` names an OpenAI-compatible endpoint (text only: no logits, no tokenizer) rather than a
    local model."""
    return str(spec).startswith(("http://", "https://"))


def load_teacher(spec: str | Path, api_key: str | None = None, model: str | None = None, **kwargs) -> Teacher:
    """``http(s)://…/v1`` is an OpenAI-compatible endpoint serving `model` (key `api_key`); a name in
    `guard.pretrained.PRETRAINED` (``smollm2``) is that real model from its pip package; anything else is a
    local model directory (safetensors only, see `load_causal_lm`)."""
    if is_remote(spec):
        return OpenAITeacher(str(spec), model=model or "default", api_key=api_key, **kwargs)
    # torch and transformers: heavy, and optional to a gateway in front of an upstream URL, which loads no model
    from guard.hf_teacher import HFTeacher
    if str(spec) in PRETRAINED:
        return HFTeacher(model_dir(str(spec)), **kwargs)
    return HFTeacher(spec, **kwargs)
