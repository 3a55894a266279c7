"""A live server on a tiny checkpoint in GLM-5's format (its published Jinja template): chat_template_kwargs
reach the template, tools and tool results render as GLM writes them, reasoning splits at </think>."""
from __future__ import annotations

import json
import httpx
import jsonschema
import openai
import pytest

from dsaserve.engine.tokenizer import Tokenizer
from server_process import ServerProcess, module_server
import chat_cases
from test_chat_encoding import WEATHER

pytestmark = pytest.mark.timeout(300)
FLAGS = dict(page_size=4, max_total_tokens=16384, reasoning_parser="glm45")
TOOLS_SYSTEM = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, '
    '"required": ["city"]}}}\n</tools>\n\n'
    "For each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value><arg_key>"
    "{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>")
HI = [{"role": "user", "content": "Hi"}]
AGENT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
         {"role": "assistant", "content": None, "reasoning_content": "r", "tool_calls": [
             {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
         {"role": "tool", "tool_call_id": "1", "content": "Sunny"}, {"role": "tool", "content": "Rain"}]
# (name, messages, tools, chat_template_kwargs, expected prompt)
CASES = [
    ("thinking by default", HI, None, None, "[gMASK]<sop><|user|>Hi<|assistant|><think>"),
    ("enable_thinking false", HI, None, {"enable_thinking": False}, "[gMASK]<sop><|user|>Hi<|assistant|></think>"),
    ("tools", HI, [WEATHER], None, "[gMASK]<sop>" + TOOLS_SYSTEM + "<|user|>Hi<|assistant|><think>"),
    ("tool call and two results", AGENT, None, None,
     "[gMASK]<sop><|system|>Be brief.<|user|>Weather?<|assistant|><think>r</think><tool_call>get_weather<arg_key>city"
     "</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
     "<|observation|><tool_response>Sunny</tool_response><tool_response>Rain</tool_response><|assistant|><think>"),
    ("earlier reasoning cleared", AGENT[:3] + [{"role": "user", "content": "More?"}], None, None,
     "[gMASK]<sop><|system|>Be brief.<|user|>Weather?<|assistant|></think><tool_call>get_weather<arg_key>city"
     "</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
     "<|user|>More?<|assistant|><think>"),
    ("developer is the system message", [{"role": "developer", "content": "Be brief."}] + HI, None, None,
     "[gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|><think>"),
    ("results in the calls' order by tool_call_id", AGENT[:2] + [{**AGENT[2], "tool_calls": AGENT[2]["tool_calls"] + [
        {"id": "2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "2", "content": "Noon"}, {"role": "tool", "tool_call_id": "1", "content": "Sunny"}],
     None, None,
     "[gMASK]<sop><|system|>Be brief.<|user|>Weather?<|assistant|><think>r</think><tool_call>get_weather<arg_key>city"
     "</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
     "<tool_call>get_time</tool_call><|observation|><tool_response>Sunny</tool_response><tool_response>Noon"
     "</tool_response><|assistant|><think>"),
    ("clear_thinking false keeps it", AGENT[:3] + [{"role": "user", "content": "More?"}], None,
     {"clear_thinking": False},
     "[gMASK]<sop><|system|>Be brief.<|user|>Weather?<|assistant|><think>r</think><tool_call>get_weather<arg_key>"
     "city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
     "<|user|>More?<|assistant|><think>"),
]


@pytest.fixture(scope="module")
def glm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return chat_cases.chat_checkpoint(tmp_path_factory, "glm_moe_dsa", "glm5")


@pytest.fixture(scope="module")
def server(glm_path: str, tmp_path_factory: pytest.TempPathFactory):
    yield from module_server(glm_path, tmp_path_factory, **FLAGS)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return chat_cases.openai_client(server)


@pytest.fixture(scope="module")
def hf(glm_path: str):
    return Tokenizer(glm_path).hf


@pytest.mark.parametrize("name,messages,tools,kwargs,expected", CASES, ids=[c[0] for c in CASES])
def test_template_and_kwargs_reach_the_prompt(server: ServerProcess, hf, name: str, messages: list,
                                              tools: list | None, kwargs: dict | None, expected: str) -> None:
    body = {"messages": messages, "tools": tools, "chat_template_kwargs": kwargs}
    r = httpx.post(f"{server.url}/tokenize", json=body, timeout=30).json()
    assert r["tokens"] == hf.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize("messages,fields,expected", [
    (HI, {"add_generation_prompt": False}, "[gMASK]<sop><|user|>Hi"),
    (HI + [{"role": "assistant", "content": "It is"}], {"add_generation_prompt": False, "continue_final_message": True},
     "[gMASK]<sop><|user|>Hi<|assistant|></think>It is"),
], ids=["add_generation_prompt false", "continue_final_message"])
def test_generation_prompt_fields_on_tokenize_and_chat(server: ServerProcess, client: openai.OpenAI, hf,
                                                       messages: list, fields: dict, expected: str) -> None:
    """vLLM's add_generation_prompt / continue_final_message: /tokenize and chat completions render the same prompt
    (chat used to ignore both, and /tokenize the second)."""
    ids = hf.encode(expected, add_special_tokens=False)
    chat_cases.check_rendered_as(server, client, messages, fields, ids)


@pytest.mark.parametrize("call,problem", [
    ({"id": "a", "type": "function", "function": "f"}, "tool call needs its function: {'name'"),
    ({"id": "a", "type": "function", "function": {"name": "f", "arguments": 5}}, "tool call 'f': arguments must be"),
    ({"id": "a", "type": "function", "function": {"name": "f", "arguments": "{x"}}, "tool call 'f': arguments are not"),
])
def test_a_malformed_tool_call_in_history_is_a_400_naming_it(server: ServerProcess, call: dict, problem: str) -> None:
    messages = HI + [{"role": "assistant", "tool_calls": [call]}]
    for path in ("/tokenize", "/v1/chat/completions"):
        r = httpx.post(f"{server.url}{path}", json={"messages": messages, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400 and problem in r.json()["error"]["message"], r.text


def test_continue_final_message_needs_add_generation_prompt_false(server: ServerProcess) -> None:
    body = {"messages": HI + [{"role": "assistant", "content": "It is"}], "continue_final_message": True}
    for path in ("/tokenize", "/v1/chat/completions"):
        r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message", r.text
        assert "needs add_generation_prompt: false" in r.json()["error"]["message"]


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_reasoning_split_follows_the_template_kwarg(client: openai.OpenAI, enable_thinking: bool) -> None:
    model = client.models.list().data[0].id
    kw = dict(model=model, messages=HI, max_tokens=8, temperature=0,
              extra_body={"chat_template_kwargs": {"enable_thinking": enable_thinking}, "ignore_eos": True})
    msg = client.chat.completions.create(**kw).choices[0].message
    text = msg.reasoning_content if enable_thinking else msg.content
    assert text and "</think>" not in text
    assert (msg.content, msg.reasoning_content) == ((None, text) if enable_thinking else (text, None))


# -- structured output and forced tool calls (thinking off: the reply is the constrained answer) ------
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def test_a_thinking_budget_ends_the_reasoning(client: openai.OpenAI, server: ServerProcess) -> None:
    chat_cases.check_thinking_budget(client, client.models.list().data[0].id, server.url, {}, NO_THINK)


def test_reasoning_effort_sets_enable_thinking(server: ServerProcess) -> None:
    """OpenAI's reasoning_effort on GLM, whose template thinks unless told not to: "none" renders the prompt of
    enable_thinking false (the default's differs), any other effort that of true; a client's own switch wins."""
    def tokens(**body) -> list[int]:
        return httpx.post(f"{server.url}/tokenize", timeout=30,
                          json={"messages": [{"role": "user", "content": "Why?"}], **body}).json()["tokens"]
    off, on = (tokens(chat_template_kwargs={"enable_thinking": switch}) for switch in (False, True))
    assert off != tokens() and tokens(reasoning_effort="none") == off and tokens(reasoning_effort="low") == on
    assert tokens(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}) == on


def test_json_schema_answers_validate(client: openai.OpenAI) -> None:
    chat_cases.check_json_schema(client, client.models.list().data[0].id, NO_THINK)


def test_regex_and_ebnf(client: openai.OpenAI, server: ServerProcess) -> None:
    chat_cases.check_regex_ebnf_json_object(client, client.models.list().data[0].id, server.url, NO_THINK,
                                            json_object=False)


def test_tool_calling_loop(client: openai.OpenAI) -> None:
    chat_cases.check_tool_loop(client, client.models.list().data[0].id, NO_THINK)


def test_streamed_named_tool_call(client: openai.OpenAI) -> None:
    chat_cases.check_streamed_named_call(client, client.models.list().data[0].id, NO_THINK)


def test_a_strict_tool_under_auto_is_held_to_its_schema(client: openai.OpenAI, server: ServerProcess) -> None:
    chat_cases.check_strict_tool_under_auto(client, client.models.list().data[0].id, server.url, NO_THINK)


@pytest.mark.parametrize("parallel", [True, False])
def test_strict_calls_alone_under_auto(client: openai.OpenAI, hf, parallel: bool) -> None:
    """A strict tool and nothing else constraining: the grammar holds the calls (a bias toward the <tool_call> token
    makes the model open them; without the grammar its replies were that token over and over, with no call), one
    per reply with parallel_tool_calls false (then free text), more with it."""
    strict = {"type": "function", "function": {**chat_cases.WEATHER_TOOL["function"], "strict": True}}
    opener = hf.convert_tokens_to_ids("<tool_call>")
    r = client.chat.completions.create(model="default", messages=chat_cases.ASK, tools=[strict], tool_choice="auto",
                                       parallel_tool_calls=parallel, n=3, seed=11, temperature=1.0, max_tokens=300,
                                       logit_bias={str(opener): 30}, extra_body=NO_THINK)
    counts = []
    for choice in r.choices:
        # (the bias keeps opening calls until max_tokens, the complete ones standing; or, one call allowed, text
        # follows it)
        assert choice.message.tool_calls and (not parallel or not (choice.message.content or "").strip()), choice
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), chat_cases.WEATHER_TOOL["function"]["parameters"])
        counts.append(len(choice.message.tool_calls))
    assert max(counts) > 1 if parallel else counts == [1, 1, 1], counts


def test_clear_thinking_must_be_a_boolean(server: ServerProcess) -> None:
    """The string "false" is true to the template, which would clear the earlier reasoning the client asked to keep:
    a 400 naming the kwarg, as for enable_thinking (it used to render the prompt without that reasoning)."""
    body = {"messages": AGENT[:3] + [{"role": "user", "content": "More?"}],
            "chat_template_kwargs": {"clear_thinking": "false"}, "max_tokens": 2}
    for path in ("/tokenize", "/v1/chat/completions"):
        r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text
        assert "clear_thinking must be true or false, got 'false'" in r.json()["error"]["message"]
