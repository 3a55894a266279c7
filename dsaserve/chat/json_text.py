"""Lone surrogates in decoded JSON. An escape like \\ud800 decodes to half of a UTF-16 pair, which no UTF-8 text
(a response, a tokenizer's input) can carry. The request guard checks a body's strings once; JSON decoded again
inside them (tool-call arguments, a native json_schema, the JSON a model writes in a tool call) is checked here,
by the same walk."""
from __future__ import annotations

import json
from typing import Any


def lone_surrogate(value: Any, path: str = "") -> tuple[str, str, int] | None:
    """(where, the surrogate, its index in that string) of the first string, key or value, holding a lone
    surrogate; None if there is none. `where` is a dotted path from `path` (keys and list indices). A walk
    without recursion: JSON that Python's parser took nests up to its recursion limit."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return where, item[exc.start], exc.start
            continue
        pairs = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        later = []
        for key, child in pairs:
            if isinstance(key, str):
                later.append((key, where))  # a key is checked before its value, at its object's path
            later.append((child, f"{where}.{key}" if where else str(key)))
        stack.extend(reversed(later))
    return None


def describe(found: tuple[str, str, int], whole: str) -> str:
    where, char, index = found
    return f"{where or whole} holds a lone surrogate {char!r} at character {index}: it is not valid Unicode"


def loads(text: str, path: str = "") -> Any:
    """json.loads that refuses (ValueError, as JSONDecodeError is one) a value holding a lone surrogate; `path`
    names the decoded value in the message."""
    value = json.loads(text)
    found = lone_surrogate(value, path)
    if found is not None:
        raise ValueError(describe(found, "the value"))
    return value


__all__ = ["describe", "lone_surrogate", "loads"]
