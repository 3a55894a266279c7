"""Lone surrogates in decoded JSON. An escape like \\ud800 decodes to half of a UTF-16 pair, which no UTF-8 text
(a response, a tokenizer's input) can carry. The request guard checks a body's strings once; JSON decoded again
inside them (tool-call arguments, a native json_schema, the JSON a model writes in a tool call) is checked here,
by the same walk."""
from __future__ import annotations

import json
from typing import Any


def lone_surrogate(value: Any, path: str = "") -> tuple[str, str, int] | None:
    """(where, the surrogate, its index in that string) of the first string, key or value, holding a lone
    surrogate; None if there is none. `where` is a dotted path from `path` (keys and list indices)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, value[exc.start], exc.start
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate(key, path) if isinstance(key, str) else None
        found = found or lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
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
