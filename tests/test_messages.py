"""/v1/messages (Anthropic's Messages API) through the official `anthropic` client, against chat completions of the
same conversation on the same live server (a tiny checkpoint in DeepSeek-V3.2's format, greedy, behind an API key
that the Anthropic client sends as x-api-key): the same prompt tokens, text, thinking and tool calls, streamed or
not (the client's stream accumulator checks the events' order); what it cannot carry is a 400 in Anthropic's shape."""
from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest
from pydantic import TypeAdapter

import chat_cases
from dsaserve.server import messages_api
from dsaserve.server import protocol as p
from dsaserve.server.errors import ApiError
from dsaserve.server.messages_api import BlockWriter
from server_process import ServerProcess, module_server

pytestmark = pytest.mark.timeout(300)
STREAM_EVENT: TypeAdapter = TypeAdapter(anthropic.types.RawMessageStreamEvent)
KEY = "messages-key"
GREEDY = {"temperature": 0.0}  # (clients still send it; this SDK's create() no longer names it)
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": chat_cases.WEATHER_TOOL["function"]["parameters"]}
TIME = {"name": "get_time", "description": "Current time",
        "input_schema": chat_cases.TIME_TOOL["function"]["parameters"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    path = chat_cases.chat_checkpoint(tmp_path_factory, "deepseek_v32", "deepseek_v32")
    yield from module_server(path, tmp_path_factory, page_size=4, max_total_tokens=16384,
                             reasoning_parser="deepseek-v3", api_key=KEY)


@pytest.fixture(scope="module")
def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def gpt(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _both(claude: anthropic.Anthropic, **kw) -> tuple[anthropic.types.Message, anthropic.types.Message]:
    """The message whole and streamed (the client accumulates the stream's events into its final message)."""
    whole = claude.messages.create(model="default", extra_body=GREEDY, **kw)
    with claude.messages.stream(model="default", extra_body=GREEDY, **kw) as stream:
        streamed = stream.get_final_message()
    return whole, streamed


def _blocks(message: anthropic.types.Message) -> list[dict]:
    return [{k: v for k, v in b.model_dump().items() if k != "id"} for b in message.content]


def test_text_equals_chat_completions(claude: anthropic.Anthropic, gpt: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Tell me about Oslo."}]
    whole, streamed = _both(claude, system="Be brief.", messages=msgs, max_tokens=12)
    chat = gpt.chat.completions.create(model="default", messages=[{"role": "system", "content": "Be brief."}, *msgs],
                                       max_tokens=12, temperature=0)
    assert _blocks(whole) == _blocks(streamed) == [{"type": "text", "text": chat.choices[0].message.content,
                                                    "citations": None}]
    assert whole.stop_reason == streamed.stop_reason == "max_tokens" and whole.stop_sequence is None
    u = whole.usage
    assert u.input_tokens + u.cache_read_input_tokens == chat.usage.prompt_tokens and u.output_tokens == 12
    assert streamed.usage.output_tokens == 12 and whole.id.startswith("msg_") and whole.role == "assistant"


def test_a_stop_sequence_is_named(claude: anthropic.Anthropic, gpt: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Count."}]
    free = gpt.chat.completions.create(model="default", messages=msgs, max_tokens=16, temperature=0)
    stop = free.choices[0].message.content[6:8]
    whole, streamed = _both(claude, messages=msgs, max_tokens=16, stop_sequences=[stop])
    chat = gpt.chat.completions.create(model="default", messages=msgs, max_tokens=16, temperature=0, stop=[stop])
    assert chat.choices[0].finish_reason == "stop" and stop not in chat.choices[0].message.content
    for m in (whole, streamed):
        assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop)
        assert [b.text for b in m.content] == [chat.choices[0].message.content]


def test_thinking_is_the_templates_switch(claude: anthropic.Anthropic, gpt: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    whole, streamed = _both(claude, messages=msgs, max_tokens=24,
                            thinking={"type": "enabled", "budget_tokens": 1024})
    chat = gpt.chat.completions.create(model="default", messages=msgs, max_tokens=24, temperature=0,
                                       reasoning_effort="high").choices[0].message
    assert chat.reasoning_content and _blocks(whole) == _blocks(streamed)
    assert whole.content[0].type == "thinking" and whole.content[0].thinking == chat.reasoning_content
    assert "".join(b.text for b in whole.content[1:]) == (chat.content or "")


def test_budget_tokens_bound_the_thinking(claude: anthropic.Anthropic, gpt: openai.OpenAI) -> None:
    """Enabled thinking's budget_tokens is chat's thinking_budget: the thinking ends there and text follows; a budget
    that is no integer is a 400 naming it."""
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    whole, streamed = _both(claude, messages=msgs, max_tokens=24, thinking={"type": "enabled", "budget_tokens": 4})
    chat = gpt.chat.completions.create(model="default", messages=msgs, max_tokens=24, temperature=0,
                                       reasoning_effort="high", extra_body={"thinking_budget": 4}).choices[0].message
    free = gpt.chat.completions.create(model="default", messages=msgs, max_tokens=24, temperature=0,
                                       reasoning_effort="high").choices[0].message
    assert chat.content and chat.reasoning_content != free.reasoning_content and _blocks(whole) == _blocks(streamed)
    assert [b.type for b in whole.content] == ["thinking", "text"]
    assert (whole.content[0].thinking, whole.content[1].text) == (chat.reasoning_content, chat.content)
    with pytest.raises(anthropic.BadRequestError, match="thinking.budget_tokens: Input should be a valid integer"):
        claude.messages.create(model="default", messages=msgs, max_tokens=4,
                               thinking={"type": "enabled", "budget_tokens": "4"})
    off = claude.messages.create(model="default", messages=msgs, max_tokens=8, extra_body=GREEDY,
                                 thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]


def test_forced_tool_use_and_its_result(claude: anthropic.Anthropic, gpt: openai.OpenAI,
                                        server: ServerProcess) -> None:
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    kw = dict(messages=msgs, tools=[WEATHER], max_tokens=250)
    whole, streamed = _both(claude, **kw, tool_choice={"type": "any", "disable_parallel_tool_use": True})
    chat = gpt.chat.completions.create(model="default", messages=msgs, tools=[chat_cases.WEATHER_TOOL],
                                       tool_choice="required", parallel_tool_calls=False, max_tokens=250,
                                       temperature=0).choices[0].message
    for m in (whole, streamed):
        assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use"]
        assert m.content[0].id.startswith("toolu_")  # Anthropic's id shape
        jsonschema.validate(m.content[0].input, WEATHER["input_schema"])
    assert whole.content[0].input == streamed.content[0].input == json.loads(chat.tool_calls[0].function.arguments)
    # the call and its result sent back render as the chat turn with that call and a tool message
    use = whole.content[0]
    turn = [*msgs, {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, use.model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"},
                                         {"type": "text", "text": "And tomorrow?"}]}]
    counted = claude.messages.count_tokens(model="default", messages=turn, tools=[WEATHER]).input_tokens
    chat_turn = [*msgs, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": use.id, "type": "function", "function": {
            "name": "get_weather", "arguments": chat.tool_calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "Sunny"},
        {"role": "user", "content": "And tomorrow?"}]
    tokens = httpx.post(f"{server.url}/tokenize", headers={"Authorization": f"Bearer {KEY}"},
                        json={"messages": chat_turn, "tools": [chat_cases.WEATHER_TOOL]}).json()["tokens"]
    assert counted == len(tokens)
    answer = claude.messages.create(model="default", messages=turn, tools=[WEATHER], max_tokens=6, extra_body=GREEDY)
    again = gpt.chat.completions.create(model="default", messages=chat_turn, tools=[chat_cases.WEATHER_TOOL],
                                        max_tokens=6, temperature=0)
    assert "".join(b.text for b in answer.content if b.type == "text") == (again.choices[0].message.content or "")


@pytest.mark.parametrize("body,status,kind,words", [
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "invalid_request_error", "messages[0].content[0]"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error", "tools[0]"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "tools": [
        {"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": "x"}}}}],
      "tool_choice": {"type": "any"}}, 400, "invalid_request_error", "tools[0].input_schema"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "tools": [  # strict: held, so checked
        {"name": "f", "strict": True, "input_schema": {"type": "object", "properties": {"a": {"type": "x"}}}}]},
     400, "invalid_request_error", "tools[0].input_schema of 'f'"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}]}, 400,
     "invalid_request_error", "tools[0].input_schema must be a JSON schema"),
    ({"max_tokens": 4, "messages": [  # a tool_result naming no call: named by the block's message
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "zz", "content": "r"}]}],
      "tools": [WEATHER]}, 400, "invalid_request_error", "messages[2]: the tool result's tool_call_id 'zz'"),
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error",
     "messages[0].role must be user or assistant"),
    ({"max_tokens": 4, "system": "s", "messages": []}, 400, "invalid_request_error", "messages holds no message"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "mcp_servers": []}, 400,
     "invalid_request_error", "mcp_servers"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
      "tool_choice": {"type": "any", "disable_parallel_tool_use": "yes"}}, 400, "invalid_request_error",
     "disable_parallel_tool_use must be a boolean"),
    ({"model": "other", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}, 404, "not_found_error",
     "other")])
def test_errors_in_anthropics_shape(server: ServerProcess, body: dict, status: int, kind: str, words: str) -> None:
    r = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": KEY}, json={"model": "default", **body})
    assert r.status_code == status and r.json()["type"] == "error", r.text
    assert r.json()["error"]["type"] == kind and words in r.json()["error"]["message"], r.text


def test_errors_before_any_route_in_anthropics_shape(server: ServerProcess) -> None:
    """The request guard's refusals (a body too large, a lone surrogate) and count_tokens' model check."""
    url, key = f"{server.url}/v1/messages", {"x-api-key": KEY}
    big = httpx.post(url, headers=key, content=(b"x" * 2**20 for _ in range(17)))  # past the 16 MiB default
    surrogate = httpx.post(url, headers={**key, "Content-Type": "application/json"},
                           content=b'{"model": "default", "max_tokens": 2, "messages": [{"role": "user", '
                                   b'"content": "\\ud800"}]}')
    other = httpx.post(f"{url}/count_tokens", headers=key, json={"model": "other", "messages": [
        {"role": "user", "content": "x"}]})
    for r, status, kind in ((big, 413, "request_too_large"), (surrogate, 400, "invalid_request_error"),
                            (other, 404, "not_found_error")):
        assert r.status_code == status and r.json()["error"]["type"] == kind, r.text


def _tokens(server: ServerProcess, **body) -> int:
    r = httpx.post(f"{server.url}/tokenize", headers={"Authorization": f"Bearer {KEY}"}, json=body)
    assert r.status_code == 200, r.text
    return len(r.json()["tokens"])


def test_a_whole_turn_renders_as_chats(claude: anthropic.Anthropic, server: ServerProcess) -> None:
    """System blocks, thinking, text and two tool_use blocks, a tool_result list and an error result, text blocks:
    count_tokens is /tokenize's count of the chat conversation they translate to (blocks joined by newlines, an
    error result as "Error: ..."); the thinking block is rendered (without it the count differs)."""
    calls = [{"type": "tool_use", "id": f"t{i}", "name": "get_weather", "input": {"city": c, "days": 1}}
             for i, c in enumerate(("Oslo", "Paris"))]
    turn = [{"role": "user", "content": [{"type": "text", "text": "<reminder>"},
                                         {"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "Two cities.", "signature": "s"},
                                              {"type": "text", "text": "Checking."}, *calls]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t0", "content": [
                {"type": "text", "text": "Sunny"}, {"type": "text", "text": "21 C"}]},
                {"type": "tool_result", "tool_use_id": "t1", "content": "no data", "is_error": True}]}]
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "Use tools."}]
    on = {"thinking": {"type": "enabled", "budget_tokens": 512}}
    count = lambda msgs: claude.messages.count_tokens(model="default", system=system, messages=msgs,  # noqa: E731
                                                      tools=[WEATHER], **on).input_tokens
    chat = [{"role": "system", "content": "Be brief.\nUse tools."},
            {"role": "user", "content": "<reminder>\nWeather?"},
            {"role": "assistant", "content": "Checking.", "reasoning_content": "Two cities.", "tool_calls": [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c["input"])}} for c in calls]},
            {"role": "tool", "tool_call_id": "t0", "content": "Sunny\n21 C"},
            {"role": "tool", "tool_call_id": "t1", "content": "Error: no data"}]
    assert count(turn) == _tokens(server, messages=chat, tools=[chat_cases.WEATHER_TOOL], reasoning_effort="high")
    unthought = [turn[0], {**turn[1], "content": turn[1]["content"][1:]}, turn[2]]
    assert count(unthought) != count(turn)


def test_an_assistant_prefill_is_continued(claude: anthropic.Anthropic, gpt: openai.OpenAI,
                                           server: ServerProcess) -> None:
    """A last assistant message is the reply's start (Anthropic's prefill), as chat's continue_final_message."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    cont = {"continue_final_message": True, "add_generation_prompt": False}
    assert claude.messages.count_tokens(model="default", messages=msgs).input_tokens == _tokens(
        server, messages=msgs, **cont)
    r = claude.messages.create(model="default", messages=msgs, max_tokens=6, extra_body=GREEDY)
    chat = gpt.chat.completions.create(model="default", messages=msgs, max_tokens=6, temperature=0, extra_body=cont)
    assert r.content[0].text == chat.choices[0].message.content


def test_tool_choice_variants_equal_chats(claude: anthropic.Anthropic, gpt: openai.OpenAI,
                                          server: ServerProcess) -> None:
    """any with and without parallel calls, a named tool, none (the tools left out of the prompt)."""
    msgs = [{"role": "user", "content": "Weather and time?"}]
    tools, chat_tools = [WEATHER, TIME], [chat_cases.WEATHER_TOOL, chat_cases.TIME_TOOL]
    for choice, chat_choice, parallel in (({"type": "any"}, "required", None),
                                          ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
                                          ({"type": "tool", "name": "get_time"}, {"type": "function", "function": {
                                              "name": "get_time"}}, None)):
        m = claude.messages.create(model="default", messages=msgs, tools=tools, tool_choice=choice, max_tokens=250,
                                   extra_body=GREEDY)
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        chat = gpt.chat.completions.create(model="default", messages=msgs, tools=chat_tools, tool_choice=chat_choice,
                                           max_tokens=250, temperature=0, **extra).choices[0].message
        assert [(b.name, b.input) for b in m.content if b.type == "tool_use"] == [
            (c.function.name, json.loads(c.function.arguments)) for c in chat.tool_calls], choice
    none = claude.messages.count_tokens(model="default", messages=msgs, tools=tools, tool_choice={"type": "none"})
    assert none.input_tokens == _tokens(server, messages=msgs) != claude.messages.count_tokens(
        model="default", messages=msgs, tools=tools).input_tokens


def test_output_config_format_is_the_answers_schema(claude: anthropic.Anthropic) -> None:
    r = claude.messages.create(model="default", messages=[{"role": "user", "content": "Who?"}], max_tokens=60,
                               extra_body=GREEDY, output_config={"format": {"type": "json_schema",
                                                                           "schema": chat_cases.PERSON}})
    assert r.stop_reason == "end_turn"
    jsonschema.validate(json.loads(r.content[0].text), chat_cases.PERSON)


def test_the_key_is_read_from_x_api_key(server: ServerProcess) -> None:
    body = {"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    assert httpx.post(f"{server.url}/v1/messages", json=body).status_code == 401
    bad = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": "wrong"}, json=body)
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    assert httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": KEY}, json=body).status_code == 200


@pytest.mark.parametrize("finish,matched,reason", [("stop", 1, "end_turn"), ("stop", "##", "stop_sequence"),
                                                   ("length", None, "max_tokens"), ("tool_calls", None, "tool_use")])
def test_the_writers_events_are_the_clients_types(finish: str, matched: int | str | None, reason: str) -> None:
    """Every event of a reply with thinking, text and a call validates as the client's stream events, in the
    order its accumulator takes them; the final message is the client's Message."""
    writer = BlockWriter("msg_1", "m")
    writer.start(messages_api.usage(5, 0, 2))
    writer.reasoning("Hm")
    writer.content("Hi ")
    writer.content("there")
    writer.call("call_1", "f")
    writer.arguments('{"a": ')
    writer.arguments("1}")
    final = writer.finish(p.ChatStreamChoice(index=0, delta=p.ChatDelta(), finish_reason=finish, matched_stop=matched),
                          messages_api.usage(5, 7, 2))
    events = [STREAM_EVENT.validate_json(e.split("data: ", 1)[1]) for e in writer.events]
    assert [e.type for e in events] == ["message_start"] + ["content_block_start", "content_block_delta",
                                                            "content_block_stop"] + [
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop"] + [
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    message = anthropic.types.Message.model_validate(final)
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert (message.content[0].thinking, message.content[1].text, message.content[2].input) == ("Hm", "Hi there",
                                                                                                 {"a": 1})
    assert message.stop_reason == reason and message.stop_sequence == (matched if reason == "stop_sequence" else None)
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (3, 2, 7)


def test_an_aborted_reply_is_an_error() -> None:
    """/abort_request or a shutdown: not a stop reason the API has; streamed, the error event after what was sent."""
    writer = BlockWriter("msg_1", "m")
    writer.start(messages_api.usage(5, 0, 0))
    writer.content("Hi")
    with pytest.raises(ApiError, match="aborted") as raised:
        writer.finish(p.ChatStreamChoice(index=0, delta=p.ChatDelta(), finish_reason="abort"), {})
    writer.fail(raised.value)
    assert json.loads(writer.events[-1].split("data: ", 1)[1]) == {
        "type": "error", "error": {"type": "api_error", "message": messages_api.ABORTED}}
    assert writer.events[-1].startswith("event: error\n")
