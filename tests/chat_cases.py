"""Structured-output and tool-calling checks shared by the V3.2-format and GLM-5-format server tests.
Random weights are fine: the grammar forces validity, so every answer must parse and validate."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from dsaserve.tiny import make_tiny_model, save_tokenizer
from server_process import ServerProcess

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 120},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "required": ["city", "days"], "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "units": {"type": "string", "enum": ["C", "F"]}}}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                              "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
ASK = [{"role": "user", "content": "What is the weather?"}]


def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory, arch: str, chat_format: str) -> str:
    """A tiny checkpoint whose tokenizer is in an official chat format."""
    return str(save_tokenizer(make_tiny_model(tmp_path_factory.mktemp(chat_format) / f"tiny-{chat_format}", arch),
                              chat_format))


def check_rendered_as(server: ServerProcess, client: openai.OpenAI, messages: list, fields: dict,
                      ids: list[int]) -> None:
    """/tokenize renders `messages` with the request `fields` to `ids`, and a greedy chat completion of the same
    request is the plain completion of those ids (token for token, and its prompt that long)."""
    assert httpx.post(f"{server.url}/tokenize", json={"messages": messages, **fields}).json()["tokens"] == ids
    model, as_ids = client.models.list().data[0].id, {"return_tokens_as_token_ids": True, "ignore_eos": True}
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                          extra_body={**fields, **as_ids})
    plain = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0, logprobs=0,
                                      extra_body=as_ids)
    assert chat.usage.prompt_tokens == len(ids)
    assert [t.token for t in chat.choices[0].logprobs.content] == plain.choices[0].logprobs.tokens


def openai_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def check_json_schema(client: openai.OpenAI, model: str, extra: dict) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 7, "n": 2}):
        r = client.chat.completions.create(model=model, messages=ASK, response_format=fmt, max_tokens=60,
                                           extra_body=extra, **sampling)
        assert len(r.choices) == sampling.get("n", 1)
        for c in r.choices:
            assert c.finish_reason == "stop", c
            jsonschema.validate(json.loads(c.message.content), PERSON)
    chunks = client.chat.completions.create(model=model, messages=ASK, response_format=fmt, max_tokens=60,
                                            temperature=0, stream=True, extra_body=extra)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), PERSON)


def check_regex_ebnf_json_object(client: openai.OpenAI, model: str, server_url: str, extra: dict,
                                 json_object: bool = True) -> None:
    """json_object is unbounded: only where the tiny model's greedy object closes within max_tokens."""
    r = client.chat.completions.create(model=model, messages=ASK, max_tokens=12, temperature=1.0, seed=1, n=2,
                                       extra_body={**extra, "regex": "(yes|no)-[0-9]{3}"})
    assert all(re.fullmatch("(yes|no)-[0-9]{3}", c.message.content) for c in r.choices), r.choices
    r = client.chat.completions.create(model=model, messages=ASK, max_tokens=12, temperature=0,
                                       extra_body={**extra, "ebnf": 'root ::= "answer: " ("up" | "down")'})
    assert r.choices[0].message.content in ("answer: up", "answer: down")
    if json_object:
        r = client.chat.completions.create(model=model, messages=ASK, max_tokens=40, temperature=0,
                                           response_format={"type": "json_object"}, extra_body=extra)
        assert isinstance(json.loads(r.choices[0].message.content), dict) and r.choices[0].finish_reason == "stop"
    text = client.completions.create(model=model, prompt="Numbers:", max_tokens=8, temperature=0,
                                     extra_body={"regex": "[0-9]{4}"}).choices[0].text
    assert re.fullmatch("[0-9]{4}", text), text
    for body, problem in (({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
                           "response_format"), ({"regex": "a[b"}, "unclosed character class"), ({"ebnf": "root ::= ("}, "ebnf"),
                          ({"regex": "a", "ebnf": 'root ::= "a"'}, "at most one")):
        bad = httpx.post(f"{server_url}/v1/chat/completions", timeout=60,
                         json={"model": model, "messages": ASK, "max_tokens": 4, **body, **extra})
        assert bad.status_code == 400 and problem in bad.json()["error"]["message"], bad.text


def _call_args(call) -> dict:
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def check_tool_loop(client: openai.OpenAI, model: str, extra: dict) -> None:
    """tool_choice required -> parsed calls with valid arguments; the result goes back; an answer."""
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=250, temperature=0, extra_body=extra)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 1 and not msg.content, r
    _call_args(msg.tool_calls[0])
    messages = ASK + [msg.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "Sunny, 21 C"} for c in msg.tool_calls]
    answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=8, temperature=0, extra_body=extra)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def check_streamed_named_call(client: openai.OpenAI, model: str, extra: dict) -> None:
    """A named tool_choice, streamed: id / type / name first, then argument pieces; finish_reason tool_calls."""
    chunks = list(client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=250, temperature=1.0, seed=3, stream=True, extra_body=extra))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert {d.function.name for d in deltas if d.function.name} == {"get_weather"}
    assert all(d.id is None for d in deltas if not d.function.name)
    calls = "".join(d.function.arguments or "" for d in deltas if not d.function.name)
    jsonschema.validate(json.loads(calls), WEATHER_TOOL["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # no empty chunks while the markup is held back (there were one per token): the role chunk opens the stream
    empty = [c for c in chunks[1:] if c.choices and not (c.choices[0].delta.content or c.choices[0].delta.tool_calls
                                                          or getattr(c.choices[0].delta, "reasoning_content", None)
                                                          or c.choices[0].finish_reason)]
    assert chunks[0].choices[0].delta.role == "assistant" and not empty, len(empty)


def check_strict_tool_under_auto(client: openai.OpenAI, model: str, server_url: str, extra: dict) -> None:
    """tool_choice auto with a strict tool: its calls follow its schema. The answer's regex matches nothing, so the
    reply must be calls (without the strict tool's grammar the regex alone held it: no answer could end); a strict
    tool's schema the grammar cannot follow is a 400 naming it, as a forced call's is."""
    strict = {"type": "function", "function": {**WEATHER_TOOL["function"], "strict": True}}
    r = client.chat.completions.create(model=model, messages=ASK, tools=[strict], tool_choice="auto", n=2, seed=5,
                                       temperature=1.0, max_tokens=250, extra_body={**extra, "regex": "[^\\s\\S]"})
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls and not choice.message.content, r
        for call in choice.message.tool_calls:
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    params = {"type": "object", "properties": {"a": {"type": "x"}}}
    for tool, status in (({"name": "f", "parameters": params, "strict": True}, 400),
                         ({"name": "f", "parameters": params}, 200)):
        r = httpx.post(f"{server_url}/v1/chat/completions", timeout=60, json={
            "model": model, "messages": ASK, "max_tokens": 2, "tools": [{"type": "function", "function": tool}],
            **extra})
        assert r.status_code == status, r.text
        if status == 400:
            error = r.json()["error"]
            assert error["param"] == "tools" and "tools[0].function.parameters of 'f'" in error["message"], error


def check_thinking_budget(client: openai.OpenAI, model: str, server_url: str, on: dict, off: dict) -> None:
    """thinking_budget N (vLLM's thinking_token_budget too): the reply's first N tokens are those of the reply
    without a budget (whose reasoning does not end by itself here), then </think> ends the reasoning and the
    answer follows, streamed alike; a prompt that opens no reasoning is not bounded; bad budgets are 400s."""
    end = httpx.post(f"{server_url}/tokenize", json={"prompt": "</think>", "add_special_tokens": False}).json()
    assert end["count"] == 1
    kw = dict(model=model, messages=ASK, max_tokens=16, temperature=0, logprobs=True)

    def reply(fields: dict, **budget: int):
        r = client.chat.completions.create(**kw, extra_body={**fields, **budget, "return_tokens_as_token_ids": True,
                                                             "ignore_eos": True})
        return [int(t.token.split(":")[1]) for t in r.choices[0].logprobs.content], r.choices[0].message

    free, free_msg = reply(on)
    assert end["tokens"][0] not in free[:6] and free_msg.content is None
    capped, msg = reply(on, thinking_budget=5)
    assert capped[:5] == free[:5] and capped[5] == end["tokens"][0] and len(capped) == 16
    assert free_msg.reasoning_content.startswith(msg.reasoning_content) and msg.content
    assert free_msg.reasoning_content != msg.reasoning_content
    assert reply(on, thinking_token_budget=5)[0] == capped
    chunks = list(client.chat.completions.create(**{**kw, "logprobs": False}, stream=True,
                                                 extra_body={**on, "thinking_budget": 5, "ignore_eos": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.reasoning_content or "" for d in deltas) == msg.reasoning_content
    assert "".join(d.content or "" for d in deltas) == msg.content
    assert reply(off, thinking_budget=0)[0] == reply(off)[0]  # nothing to bound
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for budget in range(12):  # some cut a character: </think> waits for it (the grammar refused it there: a 400)
        r = client.chat.completions.create(model=model, messages=ASK, max_tokens=120, temperature=0,
                                           response_format=fmt, extra_body={**on, "thinking_budget": budget})
        assert r.choices[0].finish_reason == "stop", budget
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    forced = client.chat.completions.create(model=model, messages=ASK, max_tokens=300, temperature=0, tools=TOOLS,
                                            tool_choice="required", extra_body={**on, "thinking_budget": 3})
    message = forced.choices[0].message  # the grammar's reasoning takes the forced </think>, then the calls
    assert message.reasoning_content and message.tool_calls and forced.choices[0].finish_reason == "tool_calls"
    for bad in (-1, "5", 2.0):
        r = httpx.post(f"{server_url}/v1/chat/completions", json={"model": model, "messages": ASK, "max_tokens": 2,
                                                                  "thinking_budget": bad})
        assert r.status_code == 400 and "thinking_budget" in r.json()["error"]["message"], r.text
