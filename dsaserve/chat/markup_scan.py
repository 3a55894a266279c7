"""Scanning tool-call markup a piece at a time: the exceptions that say an element needs more text or is not a
call, whitespace, literal tags, an opening tag by pattern, and where a JSON value ends before a closing tag (the
scan knows JSON strings, so a closing tag written inside one ends nothing)."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass


class NeedMore(Exception):
    """The text ends inside the element: wait for more."""


class Malformed(Exception):
    """The element is not a valid call."""


def skip_ws(text: str, pos: int) -> int:
    return len(text) - len(text[pos:].lstrip()) if pos < len(text) else pos


def literal(text: str, pos: int, *literals: str) -> tuple[str, int]:
    """Which of `literals` follows `pos` (after whitespace), and the position past it."""
    i = skip_ws(text, pos)
    for lit in literals:
        if text.startswith(lit, i):
            return lit, i + len(lit)
    if any(lit.startswith(text[i:]) for lit in literals):
        raise NeedMore
    raise Malformed


def json_value_end(text: str, start: int, close: str, final: bool = False) -> int | None:
    """Where `close` begins after the JSON object / array / string that opens at `start` (after
    whitespace); None when no such value is there or `close` does not follow it. The scan knows JSON
    strings, so markup written inside one (a closing tag as text) does not end the value. `final`: the text
    is all there will be, so a value that would need more (a string never closed) is not JSON."""
    try:
        return _scan_json_value(text, start, close)
    except NeedMore:
        if final:
            return None
        raise


def _scan_json_value(text: str, start: int, close: str) -> int | None:
    i = skip_ws(text, start)
    if i == len(text):
        raise NeedMore
    if text[i] not in '{["':
        return None
    if text.find(close, i) < 0:  # no closing tag yet: the value cannot be complete (C-speed check)
        raise NeedMore
    near_end = len(text) - len(close)
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        ch = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            elif ch < " ":  # a raw control character: no JSON string holds one
                return None
        elif ch == '"':
            in_string = True
        elif text.startswith(close, j):
            return None  # the closing tag outside a JSON string: the value is not JSON
        elif j > near_end and close.startswith(text[j:]):
            raise NeedMore  # (the tag's start, or text that goes on: more text decides, as the whole text would)
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if depth == 0 and not in_string:
            k = skip_ws(text, j + 1)
            if text.startswith(close, k):
                return k
            if close.startswith(text[k:]):
                raise NeedMore
            return None
    raise NeedMore


@dataclass(frozen=True)
class Head:
    """An opening tag: `left`, a name (any text without a double quote: the name ends at its first quote), then
    one of `rights`."""
    left: str
    rights: tuple[str, ...]

    @functools.cached_property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.left) + '([^"]*)(' + "|".join(re.escape(r) for r in self.rights) + ")")


def head(tag: Head, text: str, pos: int) -> re.Match[str] | None:
    """The tag at `pos` (after whitespace): its match (group 1 the name, group 2 which right side), or None when
    another tag is there or this one is malformed; NeedMore while more text could still complete it (as the
    pattern reads it: a `>` inside the quoted name ends nothing, the first quote ends the name)."""
    i = skip_ws(text, pos)
    if (m := tag.pattern.match(text, i)) is not None:
        return m
    tail = text[i:]
    if tag.left.startswith(tail):
        raise NeedMore
    if not tail.startswith(tag.left):
        return None
    rest = tail[len(tag.left):]
    quote = rest.find('"')
    if quote < 0 or any(r.startswith(rest[quote:]) for r in tag.rights):
        raise NeedMore
    return None
