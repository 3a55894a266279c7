"""GLM-5 replies of several tool calls, against GLM's published template as transformers renders a checkpoint's
template: an assistant turn is `</think>`, its content stripped, then its calls back to back. Parsing that text
gives the turn back, and the whitespace a model writes between or around its calls is no content (OpenAI's
`content` is null when only calls came), whole or streamed; re-rendering the parsed turn gives the same prompt."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from dsaserve.chat.glm_template import GLM_CHAT_TEMPLATE
from dsaserve.chat.parsers import GlmToolParser, OutputParser, Parsed, ReasoningSplitter
from dsaserve.engine.request import FinishReason, SamplingParams
from dsaserve.server import protocol as p
from dsaserve.server.handles import Delta, RequestHandle
from dsaserve.server.openai_answers import Call, chat_answer
from dsaserve.server.openai_api import OpenAIServing

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
CALLS = [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
         {"name": "get_time", "arguments": {}},
         {"name": "get_weather", "arguments": {"city": "Oslo"}}]
# Whitespace a model may write between calls, before the first (after </think>) and after the last.
SPACINGS = {"as rendered": ("", "", ""), "newlines": ("\n", "\n", "\n"), "blank lines": ("\n\n", " \n\n", "\n\n")}


def turn_text(content: str, calls: list[dict]) -> str:
    """The assistant turn as GLM's template renders it (after <|assistant|>), the reply's own markup."""
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": content,
                 "tool_calls": [{"type": "function", "function": c} for c in calls]}]
    text = render_jinja_template([messages], tools=TOOLS, chat_template=GLM_CHAT_TEMPLATE)[0][0]
    return text.split("<|assistant|>")[-1]


def spaced(text: str, spacing: tuple[str, str, str]) -> str:
    between, first, last = spacing
    body = text.replace("</tool_call><tool_call>", "</tool_call>" + between + "<tool_call>")
    return body.replace("</think>", "</think>" + first, 1) + last


def parser() -> OutputParser:
    return OutputParser(ReasoningSplitter(starts_inside=True), GlmToolParser(TOOLS))


def parse(text: str, piece: int | None = None) -> Parsed:
    out, cut = parser(), piece or len(text) or 1
    got = Parsed()
    for i in range(0, len(text), cut):
        got.add(out.feed(text[i:i + cut]))
    return got.add(out.finish())


@pytest.mark.parametrize("spacing", SPACINGS.values(), ids=SPACINGS.keys())
@pytest.mark.parametrize("content", ["", "Let me check.", " Two lookups:\n"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_rendered_turn_parses_back_to_itself(content: str, n: int, spacing: tuple[str, str, str]) -> None:
    """The calls as sent; content as written, none when only whitespace came with the calls (the template renders
    the content stripped, so the parsed turn renders as the reply did)."""
    rendered = turn_text(content, CALLS[:n])
    reply = spaced(rendered, spacing)
    for piece in (None, 1, 3):
        got = parse(reply, piece)
        assert got.content == (spacing[1] + content.strip() if content.strip() else ""), (reply, piece)
        assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [(c["name"], c["arguments"]) for c in
                                                                           CALLS[:n]]
        again = turn_text(got.content, [{"name": c.name, "arguments": json.loads(c.arguments)} for c in got.calls])
        assert again == rendered


def test_text_between_calls_stays_content() -> None:
    """Only a gap of whitespace alone is dropped: text with its spacing is content as written."""
    one, two = (turn_text("", [c]).removeprefix("</think>") for c in CALLS[:2])
    got = parse(f"</think>\n{one}\nThen the time:\n{two}\n")
    assert got.content == "\nThen the time:\n" and [c.name for c in got.calls] == ["get_weather", "get_time"]


def test_a_reply_without_calls_keeps_its_whitespace() -> None:
    for text in ("</think>\n\n", "</think>Hi \n", "</think>\n<tool_call>nope</tool_call>\n"):
        assert parse(text).content == text.removeprefix("</think>")


REPLY = spaced(turn_text("", CALLS[:2]), SPACINGS["newlines"])


def _serving_call(handles: list[RequestHandle]) -> tuple[OpenAIServing, Call]:
    body = p.ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], tools=TOOLS, stream=bool(handles))
    serving = OpenAIServing(SimpleNamespace(tokenizer=None), "m", None)  # type: ignore[arg-type]
    return serving, Call("c", body, [[5]], handles, "chat", parser, None)


def test_only_calls_give_null_content() -> None:
    _, call = _serving_call([])
    done = Delta(REPLY, [1], finish=FinishReason("stop"), completion_tokens=1)
    out = chat_answer(None, "m", call, [done])  # type: ignore[arg-type]  (no log-probabilities: no tokenizer)
    message = out.choices[0].message
    assert message.content is None and out.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in message.tool_calls or []] == ["get_weather", "get_time"]


def test_only_calls_stream_no_content() -> None:
    """Streamed token by token (here a few characters each): no content delta after the role's empty one."""
    pieces = [REPLY[i:i + 4] for i in range(0, len(REPLY), 4)]

    async def go() -> list[str]:
        handle = RequestHandle("r", 0, None, SamplingParams())  # type: ignore[arg-type]  (no detokenization here)
        serving, call = _serving_call([handle])
        for k, text in enumerate(pieces):
            last = k == len(pieces) - 1
            handle.queue.put_nowait(Delta(text, [k], finish=FinishReason("stop") if last else None,
                                          completion_tokens=k + 1))
        return [chunk async for chunk in serving._stream(call, [parser()])]

    events = [json.loads(e[6:]) for e in "".join(asyncio.run(go())).split("\n\n") if e and e != "data: [DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert [d.get("content") for d in deltas[1:] if d.get("content") is not None] == []
    names = [c["function"]["name"] for d in deltas for c in d.get("tool_calls") or [] if c["function"].get("name")]
    assert names == ["get_weather", "get_time"] and events[-1]["choices"][0]["finish_reason"] == "tool_calls"


# Parameters that allow a string beside other types, or say string through a $ref or an enum of strings:
# GLM's template writes a string value raw (`10001`, `true`), as it writes the JSON of a non-string one.
MAYBE = [{"type": "function", "function": {"name": "find", "parameters": {
    "type": "object", "$defs": {"Code": {"type": "string"}}, "properties": {
        "zip": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "tag": {"type": ["string", "null"]},
        "code": {"$ref": "#/$defs/Code"}, "version": {"enum": ["1", "2"]}, "n": {"type": ["number", "string"]},
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}}}]


@pytest.mark.parametrize("arguments", [
    {"zip": "10001", "tag": "true", "code": "123", "version": "2", "n": 7, "limit": 5},
    {"zip": None, "tag": None, "limit": None},
], ids=["strings that read as JSON", "nulls"])
def test_a_string_the_schema_allows_parses_back_as_a_string(arguments: dict) -> None:
    """The template renders {"zip": "10001"} as <arg_value>10001</arg_value>; a parameter whose schema allows a
    string but not a number is the string back (it came back as the integer 10001, which the schema forbids)."""
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "find", "arguments": arguments}}]}]
    text = render_jinja_template([messages], tools=MAYBE, chat_template=GLM_CHAT_TEMPLATE)[0][0]
    out = OutputParser(ReasoningSplitter(starts_inside=True), GlmToolParser(MAYBE))
    got = out.feed(text.split("<|assistant|>")[-1]).add(out.finish())
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [("find", arguments)]
