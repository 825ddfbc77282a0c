"""How a prompt becomes a model's input tokens: the one place the toolkit formats prompts.

A tokenizer with a chat template belongs to an instruct model: a prompt is a user turn (a `Conversation`
brings all of its turns), rendered by the template with the opening of the assistant's turn. A tokenizer
without one belongs to a base model or the reference lab: the prompt is raw text plus whatever special tokens
the tokenizer's own convention adds (a Llama tokenizer's BOS; nothing for GPT-2's). The teacher, the
capability metric, the student's training rows, the watermark detector, radioactivity reading and the
provenance likelihood all call `prompt_ids`, so a model is always read the way it was asked.

`HFTeacher(chat=False)` serves a templated model raw; it drops the template from its own copy of the
tokenizer, so everything that tokenizes with that teacher's tokenizer formats alike.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # in annotations only: importing transformers would load torch
    from transformers import PreTrainedTokenizerBase


class Conversation(str):
    """A chat prompt: the text defences, monitors and logs read (every turn its client wrote, the gateway's
    `chat_prompt`), carrying the messages it came from.

    A local model with a chat template reads every message through it; a remote chat endpoint gets
    `messages` and applies the upstream model's own template; a model without a template reads the text.

    Example:
        >>> prompt = Conversation("and her boss?", [{"role": "user", "content": "who is Kalon?"},
        ...                                         {"role": "assistant", "content": "a baker"},
        ...                                         {"role": "user", "content": "and her boss?"}])
        >>> str(prompt), len(prompt.messages)
        ('and her boss?', 3)
    """

    messages: list[dict[str, str]]

    def __new__(cls, text: str, messages: list[dict[str, str]]):
        prompt = super().__new__(cls, text)
        prompt.messages = messages
        return prompt


def transcript(prompt: str) -> str:
    """The whole of what was asked, as one string: every message of a `Conversation` (roles included), or the
    text. What a reply is bound to (sealed reasoning), so it cannot be moved to another conversation."""
    if isinstance(prompt, Conversation):
        return json.dumps(prompt.messages, ensure_ascii=False, sort_keys=True)
    return str(prompt)


def uses_chat(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_format(tokenizer: PreTrainedTokenizerBase | None) -> str:
    """"chat" or "raw" for a local model's tokenizer; "remote" when the backend formats prompts itself."""
    if tokenizer is None:
        return "remote"
    return "chat" if uses_chat(tokenizer) else "raw"


def messages(prompt: str) -> list[dict[str, str]]:
    return prompt.messages if isinstance(prompt, Conversation) else [{"role": "user", "content": str(prompt)}]


def render(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[str]:
    """Each prompt as the text the model reads: the chat template with the assistant's turn opened, or the
    prompt itself (its special tokens are added at tokenization)."""
    if not uses_chat(tokenizer):
        return [str(p) for p in prompts]
    return [tokenizer.apply_chat_template(messages(p), add_generation_prompt=True, tokenize=False) for p in prompts]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """The token ids each prompt reaches the model as."""
    if not prompts:
        return []
    # A rendered template already holds its special tokens (as transformers' own apply_chat_template(tokenize=True)
    # tokenizes it); raw text gets the tokenizer's.
    chat = uses_chat(tokenizer)
    return tokenizer(render(tokenizer, prompts), add_special_tokens=not chat, verbose=False)["input_ids"]


def text_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of generated text (a completion continues the prompt: no special tokens of its own)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def pair_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str], texts: list[str],
             end: bool = False) -> tuple[list[list[int]], list[int]]:
    """(prompt + text ids, prompt lengths) for prompt/completion pairs; `end` appends EOS after each text (a
    training row, or a likelihood that charges a model for stopping where the text stops)."""
    eos = [tokenizer.eos_token_id] if end else []
    prompts_ids = prompt_ids(tokenizer, prompts)
    return ([p + t + eos for p, t in zip(prompts_ids, text_ids(tokenizer, texts))], [len(p) for p in prompts_ids])
