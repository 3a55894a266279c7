"""HF tokenizer wrapper: encode, chat template, and incremental detokenization for streaming."""
from __future__ import annotations

import codecs
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsaserve.model.checkpoint import CheckpointError

if TYPE_CHECKING:
    from dsaserve.chat.render import ChatFormat


def read_chat_template(path: str | Path) -> str:
    """The text of a --chat-template file, checked to be a Jinja template (ValueError naming the file)."""
    import jinja2
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--chat-template {path}: cannot read it as a UTF-8 text file: {exc}") from None
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template {path}: not a valid Jinja template: {exc.message} "
                         f"(line {exc.lineno})") from None
    return text


class Tokenizer:
    def __init__(self, model_path: str | Path, chat_template: str | Path | None = None):
        """chat_template: a --chat-template file, which replaces the tokenizer's template."""
        from transformers import AutoTokenizer
        self.path = str(model_path)
        try:
            self.hf = AutoTokenizer.from_pretrained(self.path)
        except Exception as exc:  # transformers' messages rarely name the folder or the file
            raise CheckpointError(f"cannot load the tokenizer in {self.path}: {type(exc).__name__}: {exc}") from None
        if chat_template is not None:
            self.hf.chat_template = read_chat_template(chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens: the tokenizer's own around the text (a BOS token on DeepSeek-V3.2's)."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: its vocabulary string's length (byte-level tokens
        spell one byte per character, and a character takes at least one byte)."""
        return max(map(len, self.hf.get_vocab()), default=1)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """The ids decode(skip_special_tokens=True) leaves out: the named special tokens, and every added token
        that tokenizer.json marks special (all_special_ids lists only the named ones)."""
        added = getattr(self.hf, "added_tokens_decoder", {}) or {}
        return frozenset(self.hf.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}

    @functools.cached_property
    def _byte_alphabet(self) -> dict[str, int] | None:
        """Vocabulary character -> byte for byte-level BPE (GPT-2's alphabet: DeepSeek-V3.2, GLM-5 and the tiny
        models; printable bytes stand for themselves, the others for code points from 256 on, in byte order);
        None for other tokenizers."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None or '"ByteLevel"' not in json.dumps(json.loads(backend.to_str()).get("decoder")):
            return None
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in set(printable)]
        return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for: a byte-level token may hold part of a character, which its own
        decoding shows as U+FFFD (OpenAI's logprobs `bytes`); special tokens and other tokenizers: the UTF-8 of
        its decoding."""
        alphabet, piece = self._byte_alphabet, self.hf.convert_ids_to_tokens(token)
        if alphabet is not None and token not in self.special_ids and piece and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        return self.decode([token], skip_special_tokens=False).encode()

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


class CharOffsets:
    """Where each token starts in the text (OpenAI's completions `text_offset`, in characters), fed tokens in
    order across a stream's chunks: a token that continues a character starts where that character does; a
    special token takes room where the text shows it (`show_special`: skip_special_tokens false)."""

    def __init__(self, tokenizer: Tokenizer, show_special: bool = False):
        self.tok, self.chars, self.show_special = tokenizer, 0, show_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, ids: list[int], echo: str | None = None) -> list[int]:
        """`echo`: the text the first of `ids` spell (an echoed prompt): a special token inside it takes room
        where that text shows it (a token-id prompt's BOS does; the BOS a tokenizer adds to a text does not)."""
        starts, base = [], self.chars
        for token in ids:
            starts.append(self.chars)
            if token not in self.tok.special_ids:
                self.chars += len(self._utf8.decode(self.tok.token_bytes(token)))
                continue
            piece, at = self.tok.decode([token], skip_special_tokens=False), self.chars - base
            shown = echo[at:].startswith(piece) if echo is not None and at < len(echo) else self.show_special
            self.chars += len(piece) if shown else 0
        return starts
