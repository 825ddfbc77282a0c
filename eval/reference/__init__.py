"""The reference lab: a small fictional world, its task, and the teachers trained on it (the embedded default).

Everything the general code takes as a parameter, the lab supplies here: its teachers by name, its public
watermark secret, its summariser, and (in `eval.traffic`) its benign traffic and fitted detector.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from eval.reference.world import Style, World, parse_question, plan, reference_world
from guard.load import load_teacher as load_model
from guard.redaction import outline
from guard.teacher import Completion, Sampling, Teacher

MODELS_DIR = Path(__file__).parent / "models"
TEACHERS = ("teacher-a", "teacher-b")
LLAMA = "teacher-llama"  # Llama, trained with a BOS token on teacher-a's phrasing: keeps prompt formatting honest
# The lab's watermark master secret, public so that lab experiments and their audits reproduce. Only lab
# commands use it, and only when asked (--lab); a deployment sets its own in $DISTILL_GUARD_WATERMARK_KEY.
LAB_MASTER = b"distill-guard reference lab: public demo secret, never for production"


def resolve(spec: str) -> str:
    """A teacher spec with the lab's names resolved: ``reference`` (teacher-a) or ``reference:NAME`` becomes
    the model directory; anything else (a directory, a URL) is returned as it is."""
    if spec != "reference" and not spec.startswith("reference:"):
        return spec
    name = spec.partition(":")[2] or "teacher-a"
    if name not in (*TEACHERS, LLAMA):
        raise ValueError(f"unknown reference teacher {name!r}; choose one of {[*TEACHERS, LLAMA]}")
    return str(MODELS_DIR / name)


def load_teacher(spec: str, api_key: str | None = None, model: str | None = None, **kwargs):
    """`guard.load.load_teacher`, with the lab's teachers known by name (see `resolve`)."""
    return load_model(resolve(spec), api_key=api_key, model=model, **kwargs)


def plan_or_outline(prompts: list[str], reasonings: list[str]) -> list[str]:
    """The lab's summariser: the reference task's plan ("look up the boss of X, then the city of that
    person"), else the general `outline`."""
    plans = [plan(p) for p in prompts]
    fallback = outline(prompts, reasonings)
    return [p if p is not None else f for p, f in zip(plans, fallback)]


class GroundTruth(Teacher):
    """The world itself writing each answer, with no teacher: every fact in a phrasing drawn uniformly, each
    prompt's phrasing seeded by the prompt. Students trained on it are the provenance study's controls that
    never learned from a model. A prompt that is not a reference question gets an empty completion."""

    name = "ground-truth"

    def __init__(self, world: World | None = None, style_seed: int = 0):
        self.world = world or reference_world()
        self.style = Style(style_seed, sharpness=0.0)

    def complete(self, prompts: list[str], sampling: Sampling = Sampling(), callers=None) -> list[Completion]:
        out = []
        for prompt in prompts:
            question = parse_question(prompt)
            if question is None:
                out.append(Completion(text="", finish_reason="length"))
                continue
            digest = hashlib.sha256(f"{prompt}|{sampling.seed}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            out.append(Completion(text=self.world.render(question, self.style, rng)))
        return out
