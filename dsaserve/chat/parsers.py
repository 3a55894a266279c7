"""Incremental parsers of model output: reasoning (`<think>...</think>`) and tool calls (DSML, GLM).

Every parser is one state machine fed text pieces as they stream (`feed`) and closed by `finish`; a
whole answer is parsed by feeding it at once, so a stream's pieces always add up to the whole answer
however the text was cut. Text that might be the start of a marker is held back until it is not.
A tool call is emitted only once it is complete and valid; malformed markup goes to the content as
it was written, never dropped (a call the reply's end cuts short after complete calls, or a forced one, is dropped).
Whitespace that is all the text between two calls, or between a call and the start or end of the reply,
separates calls and is not content (the chat templates render an assistant turn's calls without it), so a
reply of calls alone has empty content.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dsaserve.chat import dsv32, json_text
from dsaserve.chat.markup_scan import Head, Malformed, NeedMore, head, json_value_end, literal
from dsaserve.chat.tools import JSON_TYPE, allowed_types, parameters_of

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
    """Length of the longest end of `text` that is the start of a marker (and so may still become one), with the
    U+FFFD after it of a reply cut inside a marker's character (the detokenizer's for the bytes it had: the cut
    marker's rules apply to it, a forced call's drops it)."""
    core = text.rstrip("\ufffd")
    for n in range(min(len(core), max((len(m) for m in markers), default=0) - 1), 0, -1):
        if any(m.startswith(core[-n:]) for m in markers):
            return n + len(text) - len(core)
    return 0


class ReasoningSplitter:
    """Reasoning until `</think>`, then content. The reply starts inside reasoning when the prompt
    opened it (`starts_inside`), or when the reply itself begins with `<think>`."""

    def __init__(self, starts_inside: bool, start: str = "<think>", end: str = "</think>", whole: bool = False):
        """whole: the reasoning comes out in one piece once it ends (SGLang's stream_reasoning false)."""
        self.start, self.end, self.whole = start, end, whole
        self.state = "reasoning" if starts_inside else "begin"
        self.buf = self.held = ""

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
                self.held += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                return self._reasoning(out, done=False)
            self.held += self.buf[:at]
            self.buf, self.state = self.buf[at + len(self.end):], "content"
            self._reasoning(out, done=True)
        out.content, self.buf = self.buf, ""
        return out

    def finish(self) -> Parsed:
        if self.state == "reasoning":
            self.held, self.buf = self.held + self.buf, ""
        out = self._reasoning(Parsed(), done=True)
        out.content, self.buf = self.buf, ""
        return out

    @property
    def reasoning_open(self) -> bool:
        """The reply is inside its reasoning (streamed or held back until it ends)."""
        return self.state == "reasoning"

    def _reasoning(self, out: Parsed, done: bool) -> Parsed:
        if done or not self.whole:
            out.reasoning, self.held = self.held, ""
        return out


class ToolCallParser:
    """Content with tool-call blocks in it. Subclasses give the markers and parse one complete element."""
    starts: tuple[str, ...] = ()

    def __init__(self, tools: list[dict[str, Any]], max_calls: int | None = None, forced: bool = False,
                 calls_first: bool = False):
        """max_calls: the calls returned (parallel_tool_calls false: 1); later ones are dropped, not content.
        forced: tool_choice required / named, the reply is calls alone (its grammar). calls_first: the reply is an
        answer (response_format, regex, ebnf) or calls (strict tools beside it): once an answer begins, markup in it
        is its text, not a call past the tools' grammar."""
        self.schemas = {t["function"]["name"]: parameters_of(t["function"]) for t in tools}
        self.max_calls, self.num_calls, self.forced, self.calls_first = max_calls, 0, forced, calls_first
        self.calls_before_block = 0  # num_calls when the current block opened
        self.buf, self.raw = "", ""  # raw: this block's text not yet turned into calls
        self.in_block = self.failed = False
        self.gap, self.gap_has_text = "", False  # the text since the last call (held while all whitespace)
        self.final = False  # finish(): no more text comes (a JSON string still open never closes)
        self.tried_to = 0  # buf's length when the current element last needed more text (0: not tried)

    def feed(self, text: str) -> Parsed:
        self.buf += text
        out = Parsed()
        while True:
            if not self.in_block:
                starts = self._markers()
                hits = [(i, m) for m in starts if (i := self.buf.find(m)) >= 0]
                if not hits:
                    keep = held_back(self.buf, starts)
                    self._text(self.buf[:len(self.buf) - keep], out)
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                at, marker = min(hits, key=lambda h: (h[0], -len(h[1])))
                self._text(self.buf[:at], out)
                self.buf = self.buf[at:]
                if not self._markers():  # the text before it began an answer: the marker is the answer's text
                    continue
                self.raw, self.buf = marker, self.buf[len(marker):]
                self.in_block, self.failed, self.calls_before_block = True, False, self.num_calls
                self.tried_to = 0
            elif not self._block(out):
                return out

    def _markers(self) -> tuple[str, ...]:
        """The markers that open a call now: none once an answer began where the reply is an answer or calls."""
        return () if self.calls_first and self.gap_has_text and not self.num_calls else self.starts

    def finish(self, cut: bool = False) -> Parsed:
        """cut: max_tokens or a stop string ended the reply (not the model's own end)."""
        self.final = True
        out = self.feed("")
        if self._cut_after_calls(cut):  # the complete calls stand; the cut one is dropped
            self.buf = self.raw = ""
        self._text(self.raw + self.buf, out)  # an unterminated block stays text
        if self.num_calls == 0:  # a reply without calls keeps its whitespace
            out.content += self.gap
        self.buf = self.raw = self.gap = ""
        self.in_block = False
        return out

    def _cut_after_calls(self, cut: bool) -> bool:
        """The reply ended inside a call after complete calls, or was cut (`cut`) inside the marker that opens one
        (held back outside a block: at the model's own end such text, "x <", is content). A reply whose first call
        is cut keeps it as text (no call came, the text is all there is, as SGLang and vLLM answer), unless the
        call was forced: then the reply is calls alone and what a cut left of one is no content."""
        if cut and self.forced:
            return True
        if not self.num_calls:
            return False
        if not self.in_block:
            return cut and bool(self.buf.strip())  # (held whitespace is the reply's own: the gap's rule applies)
        return not self.failed and self._cut_short()

    def _cut_short(self) -> bool:
        """The reply ended inside the current element: what is left of it (buf) begins a call (or the block's
        closing tag) that more text would have completed, not malformed markup."""
        raise NotImplementedError

    def _text(self, text: str, out: Parsed) -> None:
        """Content outside calls. Whitespace is held while it is all the gap since the last call (or the reply's
        start) holds: the next call drops it, other text releases it."""
        if self.gap_has_text:
            out.content += text
            return
        self.gap += text
        if self.gap.strip():
            out.content += self.gap
            self.gap, self.gap_has_text = "", True

    def _fail_until(self, end: str, out: Parsed) -> bool:
        """Malformed: everything up to and including `end` is content. False: wait for more text."""
        self.failed = True
        at = self.buf.find(end)
        if at < 0:
            return False
        self._text(self.raw + self.buf[:at + len(end)], out)
        self.buf, self.raw, self.in_block = self.buf[at + len(end):], "", False
        return True

    def _may_be_complete(self, *ends: str) -> bool:
        """Whether the element may be whole: an end tag ends in text the last attempt had not read (a tag written
        inside a JSON string ends nothing, and scanning the value again at every piece was quadratic), or one is
        anywhere once the reply has ended."""
        return any(self.buf.find(end, 0 if self.final else max(0, self.tried_to - len(end) + 1)) >= 0
                   for end in ends)

    def _ran_out(self) -> bool:
        """The element needs more text: an end tag that completes it ends past the text there is now."""
        self.tried_to = len(self.buf)
        return False

    def _take(self, n: int) -> str:
        self.tried_to = 0
        piece, self.buf = self.buf[:n], self.buf[n:]
        self.raw += piece
        return piece

    def _call(self, name: str, args: dict[str, Any], out: Parsed) -> bool:
        if self.schemas and name not in self.schemas:
            return False
        if self.max_calls is None or self.num_calls < self.max_calls:
            out.calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
        self.num_calls += 1
        self.raw = self.gap = ""  # the whitespace before the call separated it
        self.gap_has_text = False
        return True

    def _block(self, out: Parsed) -> bool:
        """Consume from the current block; True when progress was made (call again)."""
        raise NotImplementedError


_INVOKE = Head(f'<{dsv32.DSML}invoke name="', ('">',))
_PARAM = Head(f'<{dsv32.DSML}parameter name="', ('" string="true">', '" string="false">'))  # (text, JSON)


def _dsml_invoke(text: str, final: bool = False) -> tuple[int, str, dict[str, Any]]:
    """The invoke element at the start of `text`: its end, the tool's name and its arguments (`final`: see
    json_value_end)."""
    m = head(_INVOKE, text, 0)
    if m is None:
        raise Malformed
    name, pos, args = m.group(1), m.end(), {}
    while (p := head(_PARAM, text, pos)) is not None:
        key, value_at, is_text = p.group(1), p.end(), p.group(2) == _PARAM.rights[0]
        end = None if is_text else json_value_end(text, value_at, dsv32.PARAM_END, final)
        if end is None and (end := text.find(dsv32.PARAM_END, value_at)) < 0:
            raise NeedMore
        value = text[value_at:end]  # string="false" that is no JSON: its text, as GLM's parser and SGLang take it
        args[key] = value if is_text else _json_or_text(value)  # (a key given twice: its last value stands)
        pos = end + len(dsv32.PARAM_END)
    return literal(text, pos, dsv32.INVOKE_END)[1], name, args


class DsmlToolParser(ToolCallParser):
    """DeepSeek-V3.2: `\\n\\n<｜DSML｜function_calls>` then `invoke` elements, then the closing tag."""
    starts = ("\n\n" + dsv32.CALLS_START, dsv32.CALLS_START)

    def _block(self, out: Parsed) -> bool:
        if self.failed:
            return self._fail_until(dsv32.CALLS_END, out)
        lead = len(self.buf) - len(self.buf.lstrip())
        rest = self.buf[lead:]
        if rest.startswith(dsv32.CALLS_END):
            if self.num_calls == self.calls_before_block:  # an empty block is no call: it stays text
                self._text(self.raw + self.buf[:lead + len(dsv32.CALLS_END)], out)
            self.buf, self.raw, self.in_block = rest[len(dsv32.CALLS_END):], "", False
            return True
        if not rest or dsv32.CALLS_END.startswith(rest):
            return False
        if not self._may_be_complete(dsv32.INVOKE_END, dsv32.CALLS_END):
            return False  # a call is emitted only once complete: parse when an end tag is there
        try:
            end, name, args = _dsml_invoke(rest, self.final)
        except NeedMore:
            return self._ran_out()
        except Malformed:
            return self._fail_until(dsv32.CALLS_END, out)
        self._take(lead + end)
        return self._call(name, args, out) or self._fail_until(dsv32.CALLS_END, out)

    def _cut_short(self) -> bool:
        if dsv32.CALLS_END.startswith(self.buf.strip()):
            return True
        try:
            _dsml_invoke(self.buf, final=True)
        except NeedMore:
            return True
        except Malformed:
            return False
        return False  # (a complete invoke was parsed when fed)


class GlmToolParser(ToolCallParser):
    """GLM-4.5 / 4.7 / 5: `<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>...</tool_call>`;
    a value is text where the tool's schema says string, else JSON (text if it does not parse, or if its JSON is of a
    type the schema does not allow where it allows a string)."""
    starts = ("<tool_call>",)
    end = "</tool_call>"

    def _block(self, out: Parsed) -> bool:
        if not self._may_be_complete(self.end):
            return False  # a call is emitted only once complete: parse when its end tag is there
        try:
            end, name, args = self._element(self.buf)
        except NeedMore:
            return self._ran_out()
        except Malformed:
            return self._fail_until(self.end, out)
        self._take(end)
        if not (name and self._call(name, args, out)):
            self._text(self.raw, out)  # an unknown tool: the element stays text
        self.raw, self.in_block = "", False
        return True

    def _cut_short(self) -> bool:
        try:
            self._element(self.buf)
        except NeedMore:
            return True
        except Malformed:
            return False
        return False  # (a complete call was parsed when fed)

    def _element(self, text: str) -> tuple[int, str, dict[str, Any]]:
        """The call after `<tool_call>`: its end, name and arguments."""
        ends = [i for i in (text.find("<arg_key>"), text.find(self.end)) if i >= 0]
        if not ends:
            raise NeedMore
        name, pos = text[:min(ends)].strip(), min(ends)
        props = (self.schemas.get(name) or {}).get("properties") or {}
        args: dict[str, Any] = {}
        while (tag := literal(text, pos, "<arg_key>", self.end))[0] == "<arg_key>":
            if (key_end := text.find("</arg_key>", tag[1])) < 0:
                raise NeedMore
            key = text[tag[1]:key_end].strip()
            value_at = literal(text, key_end + len("</arg_key>"), "<arg_value>")[1]
            schema = props.get(key)  # (a property's schema may be true / false: any value / none)
            is_string = isinstance(schema, dict) and schema.get("type") == "string"
            end = None if is_string else json_value_end(text, value_at, "</arg_value>", self.final)
            if end is None and (end := text.find("</arg_value>", value_at)) < 0:
                raise NeedMore
            value = text[value_at:end]
            # a key given twice keeps its last value (in its first place), as json.loads reads an object and as
            # SGLang's and vLLM's parsers take one: the call stands (it was content, a call the client never saw)
            args[key] = value if is_string else _json_or_text(value, allowed_types(schema, self.schemas.get(name)))
            pos = end + len("</arg_value>")
        return tag[1], name, args


def _finite_float(text: str) -> float:
    """A JSON number as a float, or ValueError past a double's range: 1e999 would read as inf and be written back
    into the call's arguments as `Infinity`, which is no JSON (a JSON grammar allows the number)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a double")
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # (NaN / Infinity, which Python's json reads by default)


def _json_or_text(value: str, allowed: set[str] | None = None) -> Any:
    """The value's JSON, or the text as written where it is no JSON (NaN, a number past a double's range, a lone
    surrogate's escape, which no UTF-8 response can carry) or where the schema allows a string and not the JSON's
    type: GLM's template writes a string raw, so the string "10001" of a string-or-null parameter is `10001`."""
    try:
        parsed = json.loads(value, parse_float=_finite_float, parse_constant=_not_json)
    except (ValueError, RecursionError):  # (model output: nested past Python's parser too)
        return value
    if json_text.lone_surrogate(parsed) is not None:
        return value
    if allowed is not None and "string" in allowed and JSON_TYPE[type(parsed)] not in allowed:
        return value
    return parsed


class OutputParser:
    """Reasoning first (when a reasoning parser is on), then content with tool calls (when tools are on)."""

    def __init__(self, reasoning: ReasoningSplitter | None, tools: ToolCallParser | None):
        self.reasoning, self.tools = reasoning, tools

    @property
    def reasoning_open(self) -> bool:
        return self.reasoning is not None and self.reasoning.reasoning_open

    def feed(self, text: str) -> Parsed:
        return self._route(self.reasoning.feed(text) if self.reasoning else Parsed(content=text), final=False)

    def finish(self, cut: bool = False) -> Parsed:
        """cut: max_tokens or a stop string ended the reply (server.openai_answers.cut_off)."""
        return self._route(self.reasoning.finish() if self.reasoning else Parsed(), final=True, cut=cut)

    def _route(self, part: Parsed, final: bool, cut: bool = False) -> Parsed:
        if self.tools is None:
            return part
        out = Parsed(reasoning=part.reasoning).add(self.tools.feed(part.content))
        return out.add(self.tools.finish(cut)) if final else out



def tool_parser(name: str, tools: list[dict[str, Any]], max_calls: int | None = None,
                forced: bool = False, calls_first: bool = False) -> ToolCallParser:
    parsers: dict[str, Callable[..., ToolCallParser]] = {
        "deepseekv32": DsmlToolParser, "glm45": GlmToolParser, "glm47": GlmToolParser}
    if name not in parsers:
        raise ValueError(f"unknown tool-call parser {name!r}: choose from {', '.join(TOOL_CALL_PARSERS)}")
    return parsers[name](tools, max_calls, forced, calls_first)
