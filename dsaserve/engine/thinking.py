"""Thinking budgets: a reply's reasoning, which its prompt opened, ends after a given number of tokens (the request
field `thinking_budget`; the sampler forces `</think>`, engine/sampler.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ThinkingBudget:
    """The reasoning a prompt opened ends after `tokens` output tokens: at output index `tokens`, unless `end_id`
    (the one token that spells `</think>`) came already, it is the only token that can be sampled (vLLM's
    `thinking_token_budget`, SGLang's `thinking_budget`); a few tokens later where the reasoning's bytes end inside
    a character there (ThinkingProgress)."""
    tokens: int
    end_id: int


GRACE_TOKENS = 8  # the most tokens a budget waits past its index for a character to end


@dataclass
class ThinkingProgress:
    """The sampler's view of a request's budgeted reasoning: whether the committed output holds the end token (searched
    once per token) and the bytes of its last tokens (a byte-level token may hold part of a character: `</think>`
    right after it breaks that character, and the reasoning's grammar refuses it)."""
    token_bytes: Callable[[int], bytes] | None  # None: no tokenizer (the sampler's own tests); no waiting
    searched: int = 0
    ended: bool = False

    def open_after(self, output_ids: list[int], pending: list[int], end_id: int) -> bool:
        """Whether the reasoning is still open after the committed tokens and a verify row's drafts."""
        if not self.ended:
            self.ended = end_id in output_ids[self.searched:]
            self.searched = len(output_ids)
        return not self.ended and end_id not in pending

    def inside_character(self, output_ids: list[int], pending: list[int]) -> bool:
        """Whether the output so far (the drafts after the committed tokens) ends inside a UTF-8 character."""
        if self.token_bytes is None:
            return False
        tail = b""
        for ids in (pending, output_ids):
            for token in reversed(ids):
                tail = self.token_bytes(token) + tail
                if len(tail) >= 4:  # (a character has at most 4)
                    return ends_inside_character(tail)
        return ends_inside_character(tail)


def ends_inside_character(data: bytes) -> bool:
    """Whether `data` ends inside a UTF-8 character: its last lead byte opens more bytes than follow it (only
    continuation bytes: invalid, no character to wait for)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # ASCII or a lead byte
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return need > back
    return False
