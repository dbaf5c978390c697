"""Prompts for instruct models through their own chat template."""
from __future__ import annotations

from typing import Optional


def chat_prompt(tokenizer, message: str, system: Optional[str] = None) -> list[int]:
    """Token ids of a one-turn conversation, ending where the assistant's answer begins."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("adaskip: this tokenizer has no chat template; pass a plain prompt instead")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
