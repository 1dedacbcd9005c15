"""The model's Hugging Face fast tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.all_special_ids = frozenset(hf_tokenizer.all_special_ids)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(str(path), use_fast=True))
        except (OSError, ValueError, TypeError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise ValueError(f"cannot load a tokenizer from {path}: {reason}") from None

    @staticmethod
    def exists(path: str | Path) -> bool:
        path = Path(path)
        return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """How one token reads on its own (for log-probability listings)."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; send a plain prompt to the completions API")
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of a conversation rendered with the chat template (which adds its own special tokens)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_special_tokens=False)
