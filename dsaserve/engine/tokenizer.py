"""HF tokenizer wrapper: encode, chat template, and incremental detokenization for streaming."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsaserve.chat.render import ChatFormat


class Tokenizer:
    def __init__(self, model_path: str | Path):
        from transformers import AutoTokenizer
        self.path = str(model_path)
        self.hf = AutoTokenizer.from_pretrained(self.path)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: its vocabulary string's length (byte-level tokens
        spell one byte per character, and a character takes at least one byte)."""
        return max(map(len, self.hf.get_vocab()), default=1)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in the model's chat format (see dsaserve.chat.render)."""
        return self.chat_format().render(messages, add_generation_prompt=add_generation_prompt).ids

    def chat_format(self, mode: str = "auto") -> ChatFormat:
        from dsaserve.chat.render import ChatFormat
        return ChatFormat(self, mode, self.model_type)

    @property
    def model_type(self) -> str | None:
        config = Path(self.path) / "config.json"
        return json.loads(config.read_text()).get("model_type") if config.is_file() else None


class IncrementalDetokenizer:
    """Emits text as tokens arrive, holding back bytes that do not yet form whole characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # end of the text already emitted, in tokens

    def add(self, new_ids: list[int]) -> str:
        self.ids += new_ids
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """Whatever is still held back at the end (even if it is not valid UTF-8)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]
