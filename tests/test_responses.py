"""/v1/responses (OpenAI's Responses API) through the official client, against chat completions of the same
conversation on the same live server (a tiny checkpoint in DeepSeek-V3.2's format, greedy): the same prompt tokens,
text, reasoning and tool calls, streamed or not (the client's own stream accumulator checks the events' order);
what it cannot carry is a 400 naming the field."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

import chat_cases
from dsaserve.server.responses_api import OutputWriter
from dsaserve.server.responses_protocol import ResponsesRequest
from dsaserve.server.responses_store import ResponseStore, StoredResponse
from server_process import ServerProcess, module_server

pytestmark = pytest.mark.timeout(300)
EVENT: TypeAdapter = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": chat_cases.WEATHER_TOOL["function"]["parameters"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    path = chat_cases.chat_checkpoint(tmp_path_factory, "deepseek_v32", "deepseek_v32")
    yield from module_server(path, tmp_path_factory, page_size=4, max_total_tokens=16384,
                             reasoning_parser="deepseek-v3")


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return chat_cases.openai_client(server)


def _chat(client: openai.OpenAI, messages: list, **kw):
    return client.chat.completions.create(model="default", messages=messages, temperature=0, **kw)


def _streamed(client: openai.OpenAI, **kw):
    """The stream's events (each validated against the client's event types; the client's stream accumulator
    raises on events out of order) and the final response, which its last event carries."""
    with client.responses.stream(model="default", temperature=0, **kw) as stream:
        events = list(stream)
    for event in events:
        EVENT.validate_python(event.to_dict())
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    final = events[-1].response
    assert events[-1].type == ("response.completed" if final.status == "completed" else "response.incomplete")
    return events, final


def _post(server: ServerProcess, body: dict) -> openai.types.responses.Response:
    """A non-streamed response, validated against the client's type (every required field there)."""
    r = httpx.post(f"{server.url}/v1/responses", json={"model": "default", "temperature": 0.0, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return Response.model_validate(r.json())


def test_a_text_reply_is_the_chat_reply(server: ServerProcess, client: openai.OpenAI) -> None:
    """instructions are the system message and a string input the user's; the reply, its usage and its end (cut by
    max_output_tokens: incomplete) equal chat completions', streamed and not."""
    limit = 6
    r = _post(server, {"instructions": "Be brief.", "input": "2+2?", "max_output_tokens": limit})
    chat = _chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                 max_completion_tokens=limit)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert [item.type for item in r.output] == ["message"]
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert chat.choices[0].finish_reason == "length" and r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens" and r.output[0].status == "incomplete"
    events, final = _streamed(client, instructions="Be brief.", input="2+2?", max_output_tokens=limit)
    assert final.output_text == r.output_text and final.status == r.status
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert final.usage.output_tokens == r.usage.output_tokens


@pytest.mark.parametrize("effort", ["high", "none"])
def test_reasoning_effort_switches_thinking(client: openai.OpenAI, effort: str) -> None:
    """Any effort but none opens the template's thinking: the reply's reasoning is a reasoning item (its text the
    chat reply's reasoning_content), streamed as reasoning_text deltas; none: no reasoning."""
    ask = [{"role": "user", "content": "Why?"}]
    r = client.responses.create(model="default", input=ask, reasoning={"effort": effort}, max_output_tokens=8,
                                temperature=0)
    chat = _chat(client, ask, max_completion_tokens=8,
                 extra_body={"chat_template_kwargs": {"thinking": effort != "none"}})
    reasoning = getattr(chat.choices[0].message, "reasoning_content", None)
    items = [item for item in r.output if item.type == "reasoning"]
    if effort == "none":
        assert not items and not reasoning and r.usage.output_tokens_details.reasoning_tokens == 0
        return
    assert reasoning and [item.content[0].text for item in items] == [reasoning]
    # the reasoning never closes within 8 tokens (random weights): every output token is a reasoning token
    assert not chat.choices[0].message.content and r.usage.output_tokens_details.reasoning_tokens == 8
    events, final = _streamed(client, input=ask, reasoning={"effort": effort}, max_output_tokens=8)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == reasoning
    assert [item.content[0].text for item in final.output if item.type == "reasoning"] == [reasoning]
    assert final.usage.output_tokens_details.reasoning_tokens == 8


def test_a_thinking_budget_ends_the_reasoning_and_counts_its_tokens(client: openai.OpenAI) -> None:
    """thinking_budget, as on chat completions, forces </think> after that many reasoning tokens, and
    reasoning_tokens counts those alone, streamed and not (this tokenizer holds </think> as an added token that is
    text, not special: its id was looked up among the special tokens, and every output token was counted)."""
    ask, budget = [{"role": "user", "content": "Why?"}], 3
    on = dict(input=ask, reasoning={"effort": "high"}, max_output_tokens=8, extra_body={"thinking_budget": budget})
    r = client.responses.create(model="default", temperature=0, **on)
    chat = _chat(client, ask, max_completion_tokens=8,
                 extra_body={"chat_template_kwargs": {"thinking": True}, "thinking_budget": budget})
    reasoning = chat.choices[0].message.reasoning_content
    assert reasoning and [item.content[0].text for item in r.output if item.type == "reasoning"] == [reasoning]
    assert r.usage.output_tokens_details.reasoning_tokens == budget < r.usage.output_tokens
    # chat completions count them too (OpenAI's completion_tokens_details, as SGLang and vLLM with a reasoning parser)
    assert chat.usage.completion_tokens_details.reasoning_tokens == budget
    streamed = list(client.chat.completions.create(
        model="default", messages=ask, temperature=0, max_completion_tokens=8, stream=True, n=2,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"chat_template_kwargs": {"thinking": True}, "thinking_budget": budget}))
    assert streamed[-1].usage.completion_tokens_details.reasoning_tokens == 2 * budget  # (n = 2: both choices')
    assert streamed[-2].usage.completion_tokens_details.reasoning_tokens == budget  # (a choice's own, so far)
    held = [c.usage for c in client.chat.completions.create(  # reasoning held back until it ends: counted meanwhile
        model="default", messages=ask, temperature=0, max_completion_tokens=8, stream=True, logprobs=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"chat_template_kwargs": {"thinking": True}, "thinking_budget": budget, "stream_reasoning": False})]
    assert [u.completion_tokens_details.reasoning_tokens for u in held[1:-1]] == \
        [min(u.completion_tokens, budget) for u in held[1:-1]] and held[-1].completion_tokens > budget
    _, final = _streamed(client, **on)
    assert final.usage.output_tokens_details.reasoning_tokens == budget
    assert final.usage.output_tokens == r.usage.output_tokens


def test_a_forced_function_call_and_its_result(client: openai.OpenAI) -> None:
    """A named tool_choice gives a function_call item (arguments valid for the schema, equal to the chat reply's
    call); sent back with its output, the conversation is the chat one with a tool message (same prompt tokens,
    same answer)."""
    ask = [{"role": "user", "content": "What is the weather?"}]
    r = client.responses.create(model="default", input=ask, tools=[WEATHER], max_output_tokens=250, temperature=0,
                                tool_choice={"type": "function", "name": "get_weather"})
    chat = _chat(client, ask, tools=[chat_cases.WEATHER_TOOL], max_completion_tokens=250,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = [item for item in r.output if item.type == "function_call"]
    [chat_call] = chat.choices[0].message.tool_calls
    assert call.name == "get_weather" and call.arguments == chat_call.function.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    events, final = _streamed(client, input=ask, tools=[WEATHER], max_output_tokens=250,
                              tool_choice={"type": "function", "name": "get_weather"})
    [streamed] = [item for item in final.output if item.type == "function_call"]
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments

    turn = [*ask, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}]
    answer = client.responses.create(model="default", input=turn, tools=[WEATHER], max_output_tokens=8,
                                     temperature=0)
    chat_answer = _chat(client, [*ask, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"}],
        tools=[chat_cases.WEATHER_TOOL], max_completion_tokens=8)
    assert answer.usage.input_tokens == chat_answer.usage.prompt_tokens
    assert answer.output_text == (chat_answer.choices[0].message.content or "")


def test_previous_response_id_continues_the_stored_conversation(client: openai.OpenAI) -> None:
    """A follow-up naming the previous response is the request with the whole conversation as input (its forced
    call, the call's result), streamed or not; the previous instructions are not carried over (OpenAI's rule).
    GET returns a stored response; DELETE forgets it; store false keeps none."""
    ask = [{"role": "user", "content": "What is the weather?"}]
    first = client.responses.create(model="default", instructions="Be brief.", input=ask, tools=[WEATHER],
                                    max_output_tokens=250, temperature=0,
                                    tool_choice={"type": "function", "name": "get_weather"})
    assert first.store and client.responses.retrieve(first.id).output == first.output
    [call] = [item for item in first.output if item.type == "function_call"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}
    follow = client.responses.create(model="default", previous_response_id=first.id, input=[result], tools=[WEATHER],
                                     max_output_tokens=8, temperature=0)
    whole = client.responses.create(model="default", input=[*ask, *[o.model_dump() for o in first.output], result],
                                    tools=[WEATHER], max_output_tokens=8, temperature=0)
    assert follow.previous_response_id == first.id and follow.output_text == whole.output_text
    assert follow.usage.input_tokens == whole.usage.input_tokens  # (no instructions: not carried over)
    _, streamed = _streamed(client, previous_response_id=first.id, input=[result], tools=[WEATHER],
                            max_output_tokens=8)
    assert streamed.output_text == follow.output_text
    # a stored follow-up is continued in turn: three turns deep
    again = client.responses.create(model="default", previous_response_id=follow.id, input="And tomorrow?",
                                    tools=[WEATHER], max_output_tokens=4, temperature=0)
    deep = client.responses.create(model="default", input=[*ask, *[o.model_dump() for o in first.output], result,
                                                          *[o.model_dump() for o in follow.output],
                                                          {"role": "user", "content": "And tomorrow?"}],
                                   tools=[WEATHER], max_output_tokens=4, temperature=0)
    assert (again.output_text, again.usage.input_tokens) == (deep.output_text, deep.usage.input_tokens)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match="not found"):
        client.responses.create(model="default", previous_response_id=first.id, input="x", max_output_tokens=2)
    unstored = client.responses.create(model="default", input="x", max_output_tokens=2, store=False)
    assert not unstored.store
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_the_store_keeps_the_most_recently_used() -> None:
    store = ResponseStore(2)
    for rid in "abc":
        store.put(rid, StoredResponse([], {"id": rid}))
    assert store.get("a") is None and store.get("b") is not None  # a went first; b is now the most recent
    store.put("d", StoredResponse([], {"id": "d"}))
    assert store.get("c") is None and store.get("b") is not None and store.delete("d") and not store.delete("d")
    empty = ResponseStore(0)
    empty.put("a", StoredResponse([], {}))
    assert empty.get("a") is None


def test_a_json_schema_text_format(server: ServerProcess, client: openai.OpenAI) -> None:
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": chat_cases.PERSON, "strict": True}}
    r = _post(server, {"input": chat_cases.ASK, "text": fmt, "max_output_tokens": 60})
    jsonschema.validate(json.loads(r.output_text), chat_cases.PERSON)
    assert r.status == "completed" and r.output[0].status == "completed" and r.incomplete_details is None
    assert r.text.format.type == "json_schema"
    chat = _chat(client, chat_cases.ASK, max_completion_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": chat_cases.PERSON, "strict": True}})
    assert r.output_text == chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"
    with client.responses.stream(model="default", input=chat_cases.ASK, text=fmt, max_output_tokens=60,
                                 temperature=0) as stream:
        final = stream.get_final_response()  # (the client's helper: a completed stream's final response)
    assert final.output_text == r.output_text and final.status == "completed"


@pytest.mark.parametrize("body,param,problem", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "Response with id 'resp_1' not found"),
    ({"conversation": "conv_1"}, "conversation", "but no conversations or prompts"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "but no conversations or prompts"),
    ({"truncation": "auto"}, "truncation", "truncates nothing"),
    ({"context_management": [{"type": "compaction"}]}, "context_management", "truncates nothing"),
    ({"input": [{"role": "user", "content": "hi"}, 5]}, "input", "input[1] must be an object"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, "input",
     "input[0].content[0]: the input_text part needs its text (a string), got 5"),
    ({"input": [{"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "c", "output": "x"}]},
     "input", "input[1]: a tool result needs an earlier assistant message"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text", "json_schema needs its schema"),
    ({"tools": [{"type": "web_search"}]}, "tools", "tools of type 'web_search' are not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input",
     "input[0].content[0]: parts of type 'input_image'"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "items of type 'item_reference'"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input", "input[0].role must be one of"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input", "input[0].arguments must be"),
    ({"text": {"format": {"type": "yaml"}}}, "text", "text.format must be of type"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice", "is not supported"),
    ({"include": ["message.output_text.logprobs"]}, "include", "log-probabilities"),
    ({"background": True}, "background", "truncates nothing"),
    ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens must be > 0, got 0"),
    ({"reasoning": {"effort": "huge"}}, "reasoning", "reasoning.effort: Input should be 'none'"),
    # the chat pipeline's refusals, in this API's names
    ({"input": "x " * 5000}, "input", "context length is 4096"),
    ({"max_output_tokens": 100_000}, "max_output_tokens", "max_output_tokens (100000) + the prompt"),
    ({"tools": [{"type": "function"}]}, "tools", "tools[0].name must be a non-empty string"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "x"}}}}, "text", "text.format: "),
    # a strict tool's schema is held, so checked (not strict: only shown to the model, a 200)
    ({"tools": [{"type": "function", "name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "x"}}}}]}, "tools", "tools[0].parameters of 'f'"),
])
def test_what_it_cannot_carry_is_a_400(server: ServerProcess, client: openai.OpenAI, body: dict, param: str,
                                       problem: str) -> None:
    r = httpx.post(f"{server.url}/v1/responses", json={"model": "default", "input": "hi", **body}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert problem in r.json()["error"]["message"], r.text
    assert client.responses.create(model="default", input="hi", max_output_tokens=2).status == "incomplete"


def _messages(items: list) -> list[dict]:
    return ResponsesRequest(input=items).messages()[0]


def test_reasoning_goes_with_the_output_of_its_own_turn() -> None:
    """A reasoning item joins the assistant output right after it (several in one turn, in order); before no
    output (a cut turn) or at the end it goes nowhere: never to a later turn."""
    user, reason = {"role": "user", "content": "u"}, lambda t: {"type": "reasoning", "summary": [], "content": [
        {"type": "reasoning_text", "text": t}]}
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    result = {"type": "function_call_output", "call_id": "c1", "output": "r"}
    cut_turn = _messages([user, reason("R1"), user, call, result])
    assert [m.get("reasoning_content") for m in cut_turn] == [None, None, None, None]
    two_in_a_turn = _messages([user, reason("R1"), {"role": "assistant", "content": "pre"}, reason("R2"), call, result])
    assert two_in_a_turn[1] == {"role": "assistant", "content": "pre", "reasoning_content": "R1R2", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert "reasoning_content" not in _messages([user, {"role": "assistant", "content": "a"}, reason("R")])[1]


@pytest.mark.parametrize("finish,status,event", [("stop", "completed", "response.completed"),
                                                 ("length", "incomplete", "response.incomplete"),
                                                 ("abort", "cancelled", "response.incomplete")])
def test_a_replys_end_is_the_responses_status(finish: str, status: str, event: str) -> None:
    """Cut by max_output_tokens: incomplete (OpenAI's event); aborted (/abort_request, shutdown): cancelled; the
    last item is incomplete unless the reply ended by itself. Events and the response validate as the client's."""
    writer = OutputWriter({"id": "resp_1", "object": "response", "created_at": 0, "model": "m", "tools": [],
                           "tool_choice": "auto", "parallel_tool_calls": True})
    writer.start()
    writer.content("Hel")
    writer.content("lo")
    final = writer.finish(finish, {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3, "input_tokens_details": {
        "cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}})
    events = [EVENT.validate_json(e.split("data: ", 1)[1]) for e in writer.events]
    assert [e.type for e in events][-1] == event and events[-1].response.status == status
    response = Response.model_validate(final)
    assert response.output_text == "Hello" and response.status == status
    assert response.output[0].status == ("completed" if finish == "stop" else "incomplete")
