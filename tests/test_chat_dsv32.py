"""A live server on a tiny checkpoint in DeepSeek-V3.2's format (no chat template: the published encoding
is used automatically): /tokenize and chat completions see exactly the published prompt, reasoning goes
to reasoning_content, bad tools / kwargs are 400s."""
from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from dsaserve.engine.tokenizer import Tokenizer
from server_process import ServerProcess, module_server
import chat_cases
from test_chat_encoding import CASES, WEATHER

pytestmark = pytest.mark.timeout(300)
FLAGS = dict(page_size=4, max_total_tokens=16384, reasoning_parser="deepseek-v3")
AS_IDS = {"return_tokens_as_token_ids": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return chat_cases.chat_checkpoint(tmp_path_factory, "deepseek_v32", "deepseek_v32")


@pytest.fixture(scope="module")
def server(ds_path: str, tmp_path_factory: pytest.TempPathFactory):
    yield from module_server(ds_path, tmp_path_factory, **FLAGS)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return chat_cases.openai_client(server)


@pytest.fixture(scope="module")
def hf(ds_path: str):
    return Tokenizer(ds_path).hf


def ids_of(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


@pytest.mark.parametrize("name,messages,thinking,tools,expected", CASES, ids=[c[0] for c in CASES])
def test_tokenize_gives_the_published_prompt(server: ServerProcess, hf, name: str, messages: list, thinking: bool,
                                             tools: list | None, expected: str) -> None:
    body = {"messages": messages, "tools": tools, "chat_template_kwargs": {"thinking": thinking}}
    r = httpx.post(f"{server.url}/tokenize", json=body, timeout=30).json()
    assert r["tokens"] == hf.encode(expected, add_special_tokens=False)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 4096
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()
    assert back == {"prompt": expected}


def test_chat_completion_sees_the_published_prompt(client: openai.OpenAI, hf) -> None:
    """Greedy tokens of the chat equal those of /v1/completions on the published prompt's ids."""
    _, messages, _, tools, expected = next(c for c in CASES if c[0] == "tools on the system message")
    model = client.models.list().data[0].id
    no_tools = "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Weather in Paris?<｜Assistant｜></think>"
    for tool_choice, prompt in (("auto", expected), ("none", no_tools)):  # "none" leaves the tools out
        ids = hf.encode(prompt, add_special_tokens=False)
        chat = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice=tool_choice,
                                              max_tokens=6, temperature=0, logprobs=True, extra_body=AS_IDS)
        plain = client.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0, logprobs=0,
                                          extra_body=AS_IDS)
        assert chat.usage.prompt_tokens == len(ids)
        assert ids_of([t.token for t in chat.choices[0].logprobs.content]) == ids_of(plain.choices[0].logprobs.tokens)


@pytest.mark.parametrize("thinking", [True, False])
def test_reasoning_content_by_thinking_mode(client: openai.OpenAI, thinking: bool) -> None:
    """Thinking on: the prompt opens <think>, so the (never closed) reply is all reasoning; off: all content."""
    model = client.models.list().data[0].id
    kw = dict(model=model, messages=[{"role": "user", "content": "2+2?"}], max_tokens=8, temperature=0,
              extra_body={"chat_template_kwargs": {"thinking": thinking}, "ignore_eos": True})
    msg = client.chat.completions.create(**kw).choices[0].message
    chunks = list(client.chat.completions.create(stream=True, **kw))
    reasoning = "".join(c.choices[0].delta.reasoning_content or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    text = msg.reasoning_content if thinking else msg.content
    assert text and "</think>" not in text
    assert (reasoning, content) == ((text, "") if thinking else ("", text))
    assert (msg.content, msg.reasoning_content) == ((None, text) if thinking else (text, None))  # SGLang: null
    # a chunk of reasoning alone has content null, not "" (clients read a string as the answer begun)
    assert all(c.choices[0].delta.content is None for c in chunks if c.choices and c.choices[0].delta.reasoning_content)


def test_separate_and_stream_reasoning_false(client: openai.OpenAI) -> None:
    """SGLang's per-request switches, thinking on (the reply is all reasoning, never closed): separate_reasoning
    false leaves it in content; stream_reasoning false streams it in one piece, once the reply has ended."""
    model = client.models.list().data[0].id
    kw = dict(model=model, messages=[{"role": "user", "content": "2+2?"}], max_tokens=8, temperature=0)
    extra = {"chat_template_kwargs": {"thinking": True}, "ignore_eos": True}
    text = client.chat.completions.create(**kw, extra_body=extra).choices[0].message.reasoning_content
    together = client.chat.completions.create(**kw, extra_body={**extra, "separate_reasoning": False})
    assert (together.choices[0].message.content, together.choices[0].message.reasoning_content) == (text, None)
    chunks = list(client.chat.completions.create(stream=True, **kw, extra_body={**extra, "stream_reasoning": False}))
    pieces = [c.choices[0].delta.reasoning_content for c in chunks if c.choices]
    assert [piece for piece in pieces if piece] == [text]


@pytest.mark.parametrize("effort", ["high", "none"])
def test_reasoning_effort_is_the_thinking_switch(server: ServerProcess, client: openai.OpenAI, effort: str) -> None:
    """OpenAI's reasoning_effort (it was dropped): "none" renders the prompt as thinking off, any other effort as on,
    and the reply's reasoning is that of the same request with chat_template_kwargs thinking; the client's own kwargs
    win. An earlier assistant turn's refusal part renders as its text."""
    ask = [{"role": "user", "content": "Why?"}]
    on = effort != "none"

    def ids(**body) -> list[str]:  # the prompt's ids (/tokenize renders chat_template_kwargs only), the reply's
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "messages": ask, "max_tokens": 6, "temperature": 0, "logprobs": True, "ignore_eos": True,
            "return_tokens_as_token_ids": True, **body}).json()
        return [r["usage"]["prompt_tokens"]] + [t["token"] for t in r["choices"][0]["logprobs"]["content"]]
    assert ids(reasoning_effort=effort) == ids(chat_template_kwargs={"thinking": on})
    for switch in ("thinking", "enable_thinking"):  # the client's own switch wins, by either name
        assert ids(reasoning_effort=effort, chat_template_kwargs={switch: not on}) == \
            ids(chat_template_kwargs={"thinking": not on})

    def prompt(**body) -> list[int]:  # /tokenize renders as chat completions does
        return httpx.post(f"{server.url}/tokenize", json={"messages": ask, **body}, timeout=30).json()["tokens"]
    assert prompt(reasoning_effort=effort) == prompt(chat_template_kwargs={"thinking": on})
    assert prompt(reasoning_effort="high") != prompt()  # (thinking is off by default here)
    kw = dict(model="default", messages=ask, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    msg = client.chat.completions.create(**kw, reasoning_effort=effort).choices[0].message
    assert bool(msg.reasoning_content) == on and bool(msg.content) != on
    refusal = [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "refusal",
                                                                                   "refusal": "No."}]}, *ask]
    said = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "No."}, *ask]
    tokens = [httpx.post(f"{server.url}/tokenize", json={"messages": m}, timeout=30).json()["tokens"]
              for m in (refusal, said)]
    assert tokens[0] == tokens[1]


def _tool(name: str, **parameters) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", **parameters}}}


@pytest.mark.parametrize("body,problem", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "not in tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"chat_template_kwargs": {"messages": []}}, "may not set messages"),
    ({"messages": [{"role": "tool", "content": "orphan"}]}, "needs an earlier assistant"),
    ({"response_format": {"type": "json_schema", "json_schema": "a schema"}}, "needs json_schema.schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": "get_weather"}}, "a named tool_choice is"),
    ({"tools": [_tool("f", properties=["a"])], "tool_choice": "required"}, "properties must be an object"),
    ({"tools": [_tool("f", required=5)], "tool_choice": "required"}, "required must be a list of property names"),
    ({"tools": [_tool("f", properties={"a": {"type": "string", "minLength": "x"}})], "tool_choice": "required"},
     "minLength and maxLength must be non-negative integers"),
    ({"tools": [_tool("f", properties={"a": {"type": "string", "minLength": 5, "maxLength": 2}})]},
     "minLength 5 is above maxLength 2"),
    ({"tools": [_tool("f", properties={"a": {"type": "string", "enum": []}})],  # (required: an unsatisfiable schema)
      "tool_choice": "required"}, "properties.a.enum is empty: no value satisfies it"),
    ({"tools": [_tool('say"hi')]}, "which the model's tool-call markup cannot carry"),
    ({"tools": [_tool("f", properties={"a": {"type": "foo"}})], "tool_choice": "required"},  # (it dumped the grammar)
     "tools[0].function.parameters of 'f' is not a valid JSON schema for a forced call: Invalid type: foo"),
    ({"ebnf": ""}, "ebnf: "),
    ({"tools": [_tool("f", properties={"<a>": {"type": "string"}})]}, "which the model's tool-call markup cannot"),
    ({"chat_template_kwargs": {"thinking": "false"}}, "thinking must be true or false, got 'false'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"arguments": "{}"}}]}, {"role": "tool", "content": "r"}]},
     "tool call has no function name"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "r"}]},
     "messages[2]: the tool result's tool_call_id 'b' names none of the calls"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": "f"}]}]}, "tool call needs its function: {'name'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]},
     "tool call 'f': arguments are not valid JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [  # (the JSON's escape)
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"a": ["\\ud800"]}'}}]}]},
     "arguments are not valid JSON (a.0 holds a lone surrogate '\\ud800' at character 0"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions is OpenAI's deprecated form of tools"),
    ({"function_call": "auto"}, "function_call is OpenAI's deprecated form of tool_choice"),
    ({"reasoning_effort": "huge"}, "reasoning_effort: Input should be 'none', 'minimal'"),
    # the implied system message that carries the tools is not counted: message 1 is the client's second
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}], "tools": [WEATHER],
      "chat_template_kwargs": {"thinking": True}}, "message 1: in thinking mode an assistant message"),
])
def test_bad_chat_input_is_a_400(client: openai.OpenAI, server: ServerProcess, body: dict, problem: str) -> None:
    model = client.models.list().data[0].id
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=30)
    assert r.status_code == 400 and problem in r.json()["error"]["message"], r.text
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "still serving"}, timeout=30).status_code == 200


@pytest.mark.parametrize("kwargs,problem", [({"tools": []}, "may not set tools"),
                                            ({"thinking": "false"}, "thinking must be true or false")])
def test_bad_chat_template_kwargs_are_named(server: ServerProcess, kwargs: dict, problem: str) -> None:
    """The same 400 on chat completions and /tokenize, its param the field at fault (it said messages)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chat_template_kwargs": kwargs}
    for path in ("/tokenize", "/v1/chat/completions"):
        r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
        assert r.status_code == 400 and problem in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "chat_template_kwargs", r.text


def test_tool_results_pair_with_calls_by_tool_call_id(server: ServerProcess) -> None:
    """The published encoding pairs results with calls by position; OpenAI clients pair them by tool_call_id
    and may send them in another order: the prompt is the one of the results in the calls' order."""
    def call(i: str, city: str) -> dict:
        return {"id": i, "type": "function", "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}
    head = [{"role": "user", "content": "Paris and Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call("c_paris", "Paris"), call("c_oslo", "Oslo")]}]
    paris = {"role": "tool", "tool_call_id": "c_paris", "content": "Paris: sun"}
    oslo = {"role": "tool", "tool_call_id": "c_oslo", "content": "Oslo: snow"}

    def tokens(messages: list) -> list[int]:
        body = {"messages": messages, "tools": [WEATHER], "chat_template_kwargs": {"thinking": False}}
        return httpx.post(f"{server.url}/tokenize", json=body, timeout=30).json()["tokens"]

    in_order = tokens(head + [paris, oslo])
    assert tokens(head + [oslo, paris]) == in_order
    no_ids = [{k: v for k, v in m.items() if k != "tool_call_id"} for m in (oslo, paris)]
    assert tokens(head + no_ids) != in_order  # without ids, the order sent is the order given


def test_tokenize_follows_tool_choice(server: ServerProcess, hf) -> None:
    """tool_choice "none" leaves the tools out of the chat prompt: /tokenize gives the same ids, and refuses a
    tool_choice that chat completions refuses, naming it."""
    _, messages, _, tools, expected = next(c for c in CASES if c[0] == "tools on the system message")
    no_tools = "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Weather in Paris?<｜Assistant｜></think>"
    for tool_choice, prompt in (("auto", expected), ("required", expected), ("none", no_tools)):
        body = {"messages": messages, "tools": tools, "tool_choice": tool_choice}
        r = httpx.post(f"{server.url}/tokenize", json=body, timeout=30).json()
        assert r["tokens"] == hf.encode(prompt, add_special_tokens=False), tool_choice
    for tool_choice, problem in (("sometimes", "tool_choice must be none, auto, required"),
                                 ({"type": "function", "function": {"name": "nope"}}, "not in tools")):
        body = {"messages": messages, "tools": tools, "tool_choice": tool_choice}
        r = httpx.post(f"{server.url}/tokenize", json=body, timeout=30)
        assert r.status_code == 400 and problem in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "tool_choice"


def test_continue_final_message_leaves_the_turn_open(server: ServerProcess, client: openai.OpenAI, hf) -> None:
    """continue_final_message (vLLM's): the prompt ends inside the last assistant message (no end of sentence after
    it), on /tokenize and chat completions alike; the encoding cannot continue another role's message: a 400."""
    messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "It is"}]
    fields = {"add_generation_prompt": False, "continue_final_message": True}
    ids = hf.encode("<｜begin▁of▁sentence｜><｜User｜>Weather in Paris?<｜Assistant｜></think>It is",
                    add_special_tokens=False)
    chat_cases.check_rendered_as(server, client, messages, fields, ids)
    for path in ("/tokenize", "/v1/chat/completions"):
        r = httpx.post(f"{server.url}{path}", json={"messages": messages[:1], **fields}, timeout=30)
        assert r.status_code == 400 and "needs an assistant message last" in r.json()["error"]["message"], r.text


def test_tokenize_prompt_and_bad_requests(server: ServerProcess, hf) -> None:
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == hf.encode("Hello world") and r["token_strs"] == hf.convert_ids_to_tokens(r["tokens"])
    bare = hf.encode("Hello world", add_special_tokens=False)
    assert len(bare) < len(r["tokens"])  # (the tokenizer's BOS)
    for add in (True, False):  # a completion's text prompt as /tokenize encodes it, BOS or not (vLLM's field)
        done = httpx.post(f"{server.url}/v1/completions", timeout=60,
                          json={"prompt": "Hello world", "max_tokens": 1, "add_special_tokens": add}).json()
        echoed = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world", "add_special_tokens": add}).json()
        assert done["usage"]["prompt_tokens"] == len(echoed["tokens"]) == len(bare) + add, done
    for body, code in (({}, 400), ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400),
                       ({"prompt": "a", "model": "other"}, 404), ({"messages": []}, 400)):
        assert httpx.post(f"{server.url}/tokenize", json=body).status_code == code
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [1, 10**6]})
    assert bad.status_code == 400 and "1000000" in bad.json()["error"]["message"]


# -- structured output and forced tool calls (the grammar makes even random weights valid) -----------

def test_json_schema_answers_validate(client: openai.OpenAI) -> None:
    chat_cases.check_json_schema(client, client.models.list().data[0].id, {})


def test_regex_ebnf_json_object(client: openai.OpenAI, server: ServerProcess) -> None:
    chat_cases.check_regex_ebnf_json_object(client, client.models.list().data[0].id, server.url, {})


def test_tool_calling_loop(client: openai.OpenAI) -> None:
    chat_cases.check_tool_loop(client, client.models.list().data[0].id, {})


def test_streamed_named_tool_call(client: openai.OpenAI) -> None:
    chat_cases.check_streamed_named_call(client, client.models.list().data[0].id, {})


def test_a_thinking_budget_ends_the_reasoning(client: openai.OpenAI, server: ServerProcess) -> None:
    chat_cases.check_thinking_budget(client, client.models.list().data[0].id, server.url,
                                     {"chat_template_kwargs": {"thinking": True}}, {})


def test_a_strict_tool_under_auto_is_held_to_its_schema(client: openai.OpenAI, server: ServerProcess) -> None:
    chat_cases.check_strict_tool_under_auto(client, client.models.list().data[0].id, server.url, {})


def test_a_forced_call_cut_by_max_tokens_leaves_no_markup(client: openai.OpenAI) -> None:
    """A forced call that max_tokens cuts: finish_reason length, no call and no content (its DSML markup was the
    content, which agent frameworks could take for the answer), streamed and not."""
    kw = dict(model="default", messages=chat_cases.ASK, tools=chat_cases.TOOLS, max_tokens=12, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert not r.choices[0].message.content and not r.choices[0].message.tool_calls
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    assert not any(c.choices[0].delta.tool_calls for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_a_forced_calls_null_length_bounds_are_no_bounds(client: openai.OpenAI) -> None:
    """`minLength: null` reads as absent, as the tools' validation reads it (the grammar took int(None): a 500)."""
    tool = _tool("f", properties={"a": {"type": "string", "minLength": None, "maxLength": 3}}, required=["a"])
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=chat_cases.ASK, tools=[tool],
                                       tool_choice="required", max_tokens=200, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and {c.function.name for c in calls} == {"f"}, r
    assert all(len(json.loads(c.function.arguments)["a"]) <= 3 for c in calls)


def test_a_forced_call_wins_over_response_format(client: openai.OpenAI) -> None:
    """response_format shapes a content reply; a forced turn replies with a call, so the call's grammar applies
    (OpenAI, and vLLM; the OpenAI Agents SDK sends both for an agent with an output type and tool_choice required).
    A reply of calls names no matched_stop (SGLang sets it to null when it reports tool_calls), streamed or not."""
    tool = _tool("f", properties={"a": {"type": "string", "maxLength": 3}}, required=["a"])
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}}}
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=chat_cases.ASK, tools=[tool],
                                       tool_choice="required", response_format=fmt, max_tokens=200, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and {c.function.name for c in choice.message.tool_calls} == {"f"}
    assert choice.matched_stop is None
    last = [c for c in client.chat.completions.create(model=r.model, messages=chat_cases.ASK, tools=[tool],
                                                      tool_choice="required", response_format=fmt, max_tokens=200,
                                                      temperature=0, stream=True) if c.choices][-1].choices[0]
    assert (last.finish_reason, last.matched_stop) == ("tool_calls", None)  # streamed as well (it named EOS)


def test_forced_call_of_a_tool_with_a_non_ascii_name(client: openai.OpenAI) -> None:
    """The forced-call grammar writes the name as the prompt does (not JSON-escaped), so the call parses."""
    tool = _tool("météo", properties={"ville": {"type": "string", "enum": ["Paris", "Oslo"]}}, required=["ville"])
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=chat_cases.ASK, tools=[tool],
                                       tool_choice={"type": "function", "function": {"name": "météo"}},
                                       max_tokens=120, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["météo"], r
    assert json.loads(calls[0].function.arguments)["ville"] in ("Paris", "Oslo")


def test_a_constraint_the_matcher_gives_up_on_is_a_400(client: openai.OpenAI, server: ServerProcess) -> None:
    """llguidance accepts a{1000000} but its lexer stops at its first token: the request ends in an error that says
    so (it used to end as a plain stop with text outside the regex), and the server serves on. So does the same
    request again: the copies of one compiled grammar share its lexer, which the first one spent (the second
    ended as a plain stop with empty text before its grammar's error took precedence)."""
    model = client.models.list().data[0].id
    for _ in range(3):
        r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                       json={"model": model, "prompt": "Letters:", "max_tokens": 8, "regex": "a{1000000}"})
        assert r.status_code == 400 and "the output constraint failed" in r.json()["error"]["message"], r.text
    text = client.completions.create(model=model, prompt="Numbers:", max_tokens=8, temperature=0,
                                     extra_body={"regex": "[0-9]{4}"}).choices[0].text
    assert re.fullmatch("[0-9]{4}", text), text


def test_an_ebnf_answer_follows_the_reasoning(client: openai.OpenAI, hf) -> None:
    """Thinking on, the prompt opens <think>: an ebnf grammar constrains the answer after </think>, as regex and
    response_format do (and SGLang does). It constrained the reply from its first token, so the answer was read as
    reasoning: content '' and reasoning_content 'answer: up'. The bias makes the reasoning end at once."""
    think_end = hf.convert_tokens_to_ids("</think>")
    r = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=chat_cases.ASK, max_tokens=20, temperature=0,
        logit_bias={str(think_end): 100},
        extra_body={"ebnf": 'root ::= "answer: " ("up" | "down")', "chat_template_kwargs": {"thinking": True}})
    message = r.choices[0].message
    assert message.content in ("answer: up", "answer: down") and not message.reasoning_content, message
    assert r.choices[0].finish_reason == "stop"
