"""Real instructions for a real instruct model: everyday requests of the kinds chat users send, for the
real-model study (watermark power and quality, the radioactivity fine-tune) and the real-model demo.

Templates x topics, shuffled once with a fixed seed so any prefix mixes kinds and topics; `split` gives
disjoint training and held-out sets (a student fine-tuned on answers to one is audited on the other).
"""

from __future__ import annotations

import random

TEMPLATES = (
    "Explain {topic} to a ten-year-old.",
    "Write a short paragraph about {topic}.",
    "What are three interesting facts about {topic}?",
    "Describe the history of {topic} in a few sentences.",
    "What are the advantages and disadvantages of {topic}?",
    "How does {topic} work?",
    "Write a short story that involves {topic}.",
    "Give me some practical advice about {topic}.",
    "Why do people find {topic} important?",
    "Write a detailed essay about {topic}.",
    "Summarize what everyone should know about {topic}.",
    "Write a poem about {topic}.",
)
TOPICS = (
    "photosynthesis", "volcanoes", "the moon", "bicycles", "coffee", "the internet", "rainbows", "chess",
    "the ocean", "baking bread", "honeybees", "electricity", "the Roman Empire", "recycling", "sleep",
    "earthquakes", "the human heart", "airplanes", "music", "gardening", "clouds", "the printing press",
    "friendship", "exercise", "libraries", "the solar system", "vaccines", "trees", "money", "trains",
    "learning a new language", "dinosaurs", "the weather", "cooking pasta", "mountains", "computers",
    "the Olympic Games", "rivers", "photography", "saving energy", "cats", "dogs", "the desert",
    "time management", "the telephone", "glaciers", "public speaking", "the stock market", "birds",
    "renewable energy", "ancient Egypt", "the brain", "soccer", "writing a resume", "the seasons",
    "chocolate", "bridges", "the immune system", "robots", "kindness",
)


def instructions(seed: int = 0) -> list[str]:
    """Every template x topic (720 prompts), in one fixed shuffled order."""
    prompts = [t.format(topic=topic) for t in TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(prompts)
    return prompts


def split(train: int, held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (training, held-out) prompts from `instructions(seed)`."""
    prompts = instructions(seed)
    if train + held_out > len(prompts):
        raise ValueError(f"{train} + {held_out} prompts asked for; there are {len(prompts)}")
    return prompts[:train], prompts[train:train + held_out]
