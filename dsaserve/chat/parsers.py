"""Incremental parsers of model output: reasoning (`<think>...</think>`) and tool calls (DSML, GLM).

Every parser is one state machine fed text pieces as they stream (`feed`) and closed by `finish`; a
whole answer is parsed by feeding it at once, so a stream's pieces always add up to the whole answer
however the text was cut. Text that might be the start of a marker is held back until it is not.
A tool call is emitted only once it is complete and valid; malformed markup goes to the content as
it was written, never dropped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dsaserve.chat import dsv32

REASONING_PARSERS = ("deepseek-v3", "glm45")
TOOL_CALL_PARSERS = ("deepseekv32", "glm45", "glm47")
DEFAULT_TOOL_PARSER = {"deepseek_v32": "deepseekv32", "glm_moe_dsa": "glm47"}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object


@dataclass
class Parsed:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def add(self, other: Parsed) -> Parsed:
        self.reasoning += other.reasoning
        self.content += other.content
        self.calls += other.calls
        return self


def held_back(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a marker (and so may still become one)."""
    for n in range(min(len(text), max(len(m) for m in markers) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


class ReasoningSplitter:
    """Reasoning until `</think>`, then content. The reply starts inside reasoning when the prompt
    opened it (`starts_inside`), or when the reply itself begins with `<think>`."""

    def __init__(self, starts_inside: bool, start: str = "<think>", end: str = "</think>"):
        self.start, self.end = start, end
        self.state = "reasoning" if starts_inside else "begin"
        self.buf = ""

    def feed(self, text: str) -> Parsed:
        self.buf += text
        out = Parsed()
        if self.state == "begin":
            if self.buf.startswith(self.start):
                self.buf, self.state = self.buf[len(self.start):], "reasoning"
            elif self.start.startswith(self.buf):
                return out  # still maybe "<think>"
            else:
                self.state = "content"
        if self.state == "reasoning":
            at = self.buf.find(self.end)
            if at < 0:
                keep = held_back(self.buf, [self.end])
                out.reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return out
            out.reasoning, self.buf, self.state = self.buf[:at], self.buf[at + len(self.end):], "content"
        out.content, self.buf = self.buf, ""
        return out

    def finish(self) -> Parsed:
        out = Parsed(reasoning=self.buf) if self.state == "reasoning" else Parsed(content=self.buf)
        self.buf = ""
        return out


class ToolCallParser:
    """Content with tool-call blocks in it. Subclasses give the markers and parse one complete element."""
    starts: tuple[str, ...] = ()

    def __init__(self, tools: list[dict[str, Any]]):
        self.schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
        self.buf, self.raw = "", ""  # raw: this block's text not yet turned into calls
        self.in_block = self.failed = False

    def feed(self, text: str) -> Parsed:
        self.buf += text
        out = Parsed()
        while True:
            if not self.in_block:
                hits = [(i, m) for m in self.starts if (i := self.buf.find(m)) >= 0]
                if not hits:
                    keep = held_back(self.buf, self.starts)
                    out.content += self.buf[:len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                at, marker = min(hits, key=lambda h: (h[0], -len(h[1])))
                out.content += self.buf[:at]
                self.raw, self.buf = marker, self.buf[at + len(marker):]
                self.in_block, self.failed = True, False
            elif not self._block(out):
                return out

    def finish(self) -> Parsed:
        out = self.feed("")
        out.content += self.raw + self.buf  # an unterminated block stays text
        self.buf = self.raw = ""
        self.in_block = False
        return out

    def _fail_until(self, end: str, out: Parsed) -> bool:
        """Malformed: everything up to and including `end` is content. False: wait for more text."""
        self.failed = True
        at = self.buf.find(end)
        if at < 0:
            return False
        out.content += self.raw + self.buf[:at + len(end)]
        self.buf, self.raw, self.in_block = self.buf[at + len(end):], "", False
        return True

    def _take(self, n: int) -> str:
        piece, self.buf = self.buf[:n], self.buf[n:]
        self.raw += piece
        return piece

    def _call(self, name: str, args: dict[str, Any], out: Parsed) -> bool:
        if self.schemas and name not in self.schemas:
            return False
        out.calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
        self.raw = ""
        return True

    def _block(self, out: Parsed) -> bool:
        """Consume from the current block; True when progress was made (call again)."""
        raise NotImplementedError


_INVOKE = re.compile(rf'<{dsv32.DSML}invoke name="([^"]*)">(.*?){re.escape(dsv32.INVOKE_END)}', re.S)
_PARAM = re.compile(rf'\s*<{dsv32.DSML}parameter name="([^"]*)" string="(true|false)">(.*?)'
                    rf'{re.escape(dsv32.PARAM_END)}', re.S)


class DsmlToolParser(ToolCallParser):
    """DeepSeek-V3.2: `\\n\\n<｜DSML｜function_calls>` then `invoke` elements, then the closing tag."""
    starts = ("\n\n" + dsv32.CALLS_START, dsv32.CALLS_START)
    invoke_open = f"<{dsv32.DSML}invoke"

    def _block(self, out: Parsed) -> bool:
        if self.failed:
            return self._fail_until(dsv32.CALLS_END, out)
        lead = len(self.buf) - len(self.buf.lstrip())
        rest = self.buf[lead:]
        if rest.startswith(dsv32.CALLS_END):
            self.buf, self.raw, self.in_block = rest[len(dsv32.CALLS_END):], "", False
            return True
        if rest.startswith(self.invoke_open):
            close = rest.find(dsv32.INVOKE_END)
            if close < 0:
                return False
            self._take(lead)
            element = self._take(close + len(dsv32.INVOKE_END))
            args = _dsml_arguments(element)
            return (args is not None and self._call(args[0], args[1], out)) or self._fail_until(dsv32.CALLS_END, out)
        if not rest or any(m.startswith(rest) for m in (dsv32.CALLS_END, self.invoke_open)):
            return False
        return self._fail_until(dsv32.CALLS_END, out)


def _dsml_arguments(element: str) -> tuple[str, dict[str, Any]] | None:
    m = _INVOKE.fullmatch(element)
    if m is None:
        return None
    args: dict[str, Any] = {}
    pos, body = 0, m.group(2)
    while (p := _PARAM.match(body, pos)) is not None:
        key, is_str, value = p.groups()
        if key in args:
            return None
        if is_str == "true":
            args[key] = value
        else:
            try:
                args[key] = json.loads(value)
            except json.JSONDecodeError:
                return None
        pos = p.end()
    return (m.group(1), args) if not body[pos:].strip() else None


_ARG = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


class GlmToolParser(ToolCallParser):
    """GLM-4.5 / 4.7 / 5: `<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>...</tool_call>`;
    a value is text where the tool's schema says string, else JSON (text if it does not parse)."""
    starts = ("<tool_call>",)
    end = "</tool_call>"

    def _block(self, out: Parsed) -> bool:
        close = self.buf.find(self.end)
        if close < 0:
            return False
        body = self._take(close)
        name, _, _ = body.partition("<arg_key>")
        name = name.strip()
        args = self._arguments(name, body[body.find("<arg_key>"):] if "<arg_key>" in body else "")
        if name and args is not None and self._call(name, args, out):
            self.buf, self.in_block = self.buf[len(self.end):], False
            return True
        return self._fail_until(self.end, out)

    def _arguments(self, name: str, text: str) -> dict[str, Any] | None:
        props = (self.schemas.get(name) or {}).get("properties") or {}
        args: dict[str, Any] = {}
        pos = 0
        while (m := _ARG.match(text, pos)) is not None:
            key, value = m.group(1).strip(), m.group(2)
            if key in args:
                return None
            schema = props.get(key)  # (a property's schema may be true / false: any value / none)
            is_string = isinstance(schema, dict) and schema.get("type") == "string"
            args[key] = value if is_string else _json_or_text(value)
            pos = m.end()
        return args if not text[pos:].strip() else None


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


class OutputParser:
    """Reasoning first (when a reasoning parser is on), then content with tool calls (when tools are on)."""

    def __init__(self, reasoning: ReasoningSplitter | None, tools: ToolCallParser | None):
        self.reasoning, self.tools = reasoning, tools

    def feed(self, text: str) -> Parsed:
        return self._route(self.reasoning.feed(text) if self.reasoning else Parsed(content=text), final=False)

    def finish(self) -> Parsed:
        return self._route(self.reasoning.finish() if self.reasoning else Parsed(), final=True)

    def _route(self, part: Parsed, final: bool) -> Parsed:
        if self.tools is None:
            return part
        out = Parsed(reasoning=part.reasoning).add(self.tools.feed(part.content))
        return out.add(self.tools.finish()) if final else out


def tool_parser(name: str, tools: list[dict[str, Any]]) -> ToolCallParser:
    parsers: dict[str, Callable[[list[dict[str, Any]]], ToolCallParser]] = {
        "deepseekv32": DsmlToolParser, "glm45": GlmToolParser, "glm47": GlmToolParser}
    if name not in parsers:
        raise ValueError(f"unknown tool-call parser {name!r}: choose from {', '.join(TOOL_CALL_PARSERS)}")
    return parsers[name](tools)
