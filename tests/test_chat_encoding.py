"""DeepSeek-V3.2's chat encoding, case by case, against strings written out from the published format
(DeepSeek's encoding folder and README: BOS, <｜User｜>...<｜Assistant｜>, <think> / </think> by thinking
mode, earlier reasoning dropped, the "## Tools" system block, DSML tool calls, <function_results>)."""
from __future__ import annotations

import copy

import pytest

from dsaserve.chat.dsv32 import encode_messages

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
# The published "## Tools" block, with the weather tool's schema line in it.
TOOLS_BLOCK = (
    "## Tools\n\nYou have access to a set of tools you can use to answer the user's question.\n"
    "You can invoke functions by writing a \"<｜DSML｜function_calls>\" block like the following as part of "
    "your reply to the user:\n"
    "<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"$FUNCTION_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
    "...\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$FUNCTION_NAME2\">\n...\n</｜DSML｜invoke>\n"
    "</｜DSML｜function_calls>\n\n"
    "String and scalar parameters should be specified as is without any escaping or quotes, while lists and "
    "objects should use JSON format. The \"string\" attribute should be set to \"true\" for string type "
    "parameters and \"false\" for other types (numbers, booleans, arrays, objects).\n\n"
    "If the thinking_mode is enabled, then after function results you should strongly consider outputting a "
    "thinking block. Here is an example:\n\n"
    "<｜DSML｜function_calls>\n...\n</｜DSML｜function_calls>\n\n<function_results>\n...\n</function_results>\n\n"
    "<think>...thinking about results</think>\n\n"
    "Here are the functions available in JSONSchema format:\n<functions>\n"
    '{"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}\n'
    "</functions>\n")
CALL_PARIS = {"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3, "units": ["C"]}'}}
CALL_OSLO = {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
DSML_PARIS = ('<｜DSML｜invoke name="get_weather">\n'
              '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
              '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
              '<｜DSML｜parameter name="units" string="false">["C"]</｜DSML｜parameter>\n'
              '</｜DSML｜invoke>')
DSML_OSLO = ('<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n</｜DSML｜invoke>')
ASK = {"role": "user", "content": "Weather in Paris?"}

# (name, messages, thinking, tools, expected prompt)
CASES = [
    ("plain chat", [{"role": "user", "content": "Hello"}], False, None,
     BOS + "<｜User｜>Hello<｜Assistant｜></think>"),
    ("system prompt", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], False, None,
     BOS + "Be brief.<｜User｜>Hi<｜Assistant｜></think>"),
    ("thinking on", [{"role": "user", "content": "2+2?"}], True, None, BOS + "<｜User｜>2+2?<｜Assistant｜><think>"),
    # DeepSeek's README example: the earlier turn's reasoning is dropped.
    ("multi-turn, earlier reasoning dropped",
     [{"role": "user", "content": "hello"},
      {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "thinking..."},
      {"role": "user", "content": "1+1=?"}], True, None,
     BOS + "<｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek." + EOS + "<｜User｜>1+1=?<｜Assistant｜><think>"),
    ("multi-turn, thinking off",
     [{"role": "user", "content": "hello"},
      {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "thinking..."},
      {"role": "user", "content": "1+1=?"}], False, None,
     BOS + "<｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek." + EOS + "<｜User｜>1+1=?<｜Assistant｜></think>"),
    ("tools on the implied empty system message", [ASK], False, [WEATHER],
     BOS + "\n\n" + TOOLS_BLOCK + "<｜User｜>Weather in Paris?<｜Assistant｜></think>"),
    ("tools on the system message", [{"role": "system", "content": "Be brief."}, ASK], False, [WEATHER],
     BOS + "Be brief.\n\n" + TOOLS_BLOCK + "<｜User｜>Weather in Paris?<｜Assistant｜></think>"),
    ("tool call with string and non-string arguments, one result",
     [ASK, {"role": "assistant", "content": None, "tool_calls": [CALL_PARIS]},
      {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}], False, None,
     BOS + "<｜User｜>Weather in Paris?<｜Assistant｜></think>\n\n<｜DSML｜function_calls>\n" + DSML_PARIS
     + "\n</｜DSML｜function_calls>" + EOS + "\n\n<function_results>\n<result>Sunny</result>\n</function_results>"
     "\n\n</think>"),
    ("thinking: reasoning kept after the last user turn, several results",
     [ASK, {"role": "assistant", "content": "Checking.", "reasoning_content": "Two cities.",
            "tool_calls": [CALL_PARIS, CALL_OSLO]},
      {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
      {"role": "tool", "tool_call_id": "call_2", "content": "Rain"}], True, None,
     BOS + "<｜User｜>Weather in Paris?<｜Assistant｜><think>Two cities.</think>Checking.\n\n"
     "<｜DSML｜function_calls>\n" + DSML_PARIS + "\n" + DSML_OSLO + "\n</｜DSML｜function_calls>" + EOS
     + "\n\n<function_results>\n<result>Sunny</result>\n<result>Rain</result>\n</function_results>\n\n<think>"),
    ("tool round done, next user turn: earlier results close thinking",
     [ASK, {"role": "assistant", "content": "", "reasoning_content": "dropped", "tool_calls": [CALL_OSLO]},
      {"role": "tool", "content": "Rain"}, {"role": "assistant", "content": "It rains.", "reasoning_content": "x"},
      {"role": "user", "content": "Thanks"}], True, None,
     BOS + "<｜User｜>Weather in Paris?<｜Assistant｜></think>\n\n<｜DSML｜function_calls>\n" + DSML_OSLO
     + "\n</｜DSML｜function_calls>" + EOS + "\n\n<function_results>\n<result>Rain</result>\n</function_results>"
     "\n\n</think>It rains." + EOS + "<｜User｜>Thanks<｜Assistant｜><think>"),
]


@pytest.mark.parametrize("name,messages,thinking,tools,expected", CASES, ids=[c[0] for c in CASES])
def test_encoding_matches_published_format(name: str, messages: list, thinking: bool, tools: list | None,
                                           expected: str) -> None:
    assert encode_messages(messages, thinking=thinking, tools=tools) == expected


def test_messages_are_not_mutated() -> None:
    messages, tools = [{"role": "system", "content": "Be brief."}, ASK], [WEATHER]
    before = copy.deepcopy((messages, tools))
    encode_messages(messages, tools=tools)
    assert (messages, tools) == before


@pytest.mark.parametrize("messages,problem", [
    ([ASK, {"role": "tool", "content": "x"}], "tool result needs an earlier assistant"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([ASK, {"role": "assistant", "content": "no reasoning"}], "needs reasoning_content or tool_calls"),
])
def test_bad_conversations_name_the_problem(messages: list, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        encode_messages(messages, thinking=True)
