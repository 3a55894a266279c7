"""Strict tools under tool_choice auto (`function.strict: true`): the reply's text is free, its calls are written in
the model's markup and a strict tool's arguments follow its schema (a tool that is not strict takes any); with
response_format, regex or ebnf the reply is that answer or calls."""
from __future__ import annotations

import copy

import httpx
import pytest

import chat_cases
from chat_cases import TOOLS
from dsaserve.chat.constrain import MARKUP_TEXTS, Constraint, build_grammar, markup_for
from dsaserve.chat.grammar import GrammarSpec, GrammarState, ll_tokenizer
from dsaserve.chat.parsers import OutputParser, Parsed, tool_parser
from dsaserve.chat.tools import MAX_FORCED_CHOICES, check_held_calls, plan_tools
from dsaserve.engine.tokenizer import Tokenizer
from dsaserve.tiny import make_tiny_model, save_tokenizer
from server_process import ServerProcess
from test_structured_grammar import DSML_CALL, GLM_CALL, feed

D = "｜DSML｜"
STRICT = copy.deepcopy(TOOLS)  # get_weather strict (city: Paris | Oslo), get_time not
STRICT[0]["function"]["strict"] = True
# a call of get_time with arguments its (empty) schema does not have: fine, it is not strict
DSML_TIME = (f'\n\n<{D}function_calls>\n<{D}invoke name="get_time">\n<{D}parameter name="zone" string="true">UTC'
             f'</{D}parameter>\n</{D}invoke>\n</{D}function_calls>')
GLM_TIME = "<tool_call>get_time<arg_key>zone</arg_key><arg_value>UTC</arg_value></tool_call>"
FORMATS = {"deepseekv32": ("deepseek_v32", "deepseek_v32", DSML_CALL, DSML_TIME),
           "glm47": ("glm_moe_dsa", "glm5", GLM_CALL, GLM_TIME)}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("strict")
    return {tool_format: str(save_tokenizer(make_tiny_model(root / fmt, arch), fmt))
            for tool_format, (arch, fmt, _, _) in FORMATS.items()}


def accepts(path: str, tool_format: str, c: Constraint, text: str, reasoning: bool = False) -> bool:
    """Whether the grammar takes `text` whole and then offers EOS (token 1)."""
    hf = Tokenizer(path).hf
    markup = markup_for(hf, ll_tokenizer(path, (1,)), MARKUP_TEXTS)
    st = GrammarState(GrammarSpec(build_grammar(c, tool_format, markup, reasoning), path, (1,)), len(hf))
    return feed(st, hf.encode(text, add_special_tokens=False)) and bool(st.allowed()[1])


@pytest.mark.parametrize("tool_format", FORMATS)
def test_text_and_calls_under_auto_with_a_strict_tool(tokenizers: dict[str, str], tool_format: str) -> None:
    _, _, call, time_call = FORMATS[tool_format]
    ok = lambda text, several=True, reasoning=False: accepts(  # noqa: E731
        tokenizers[tool_format], tool_format, Constraint(strict_tools=STRICT, several_calls=several), text, reasoning)
    assert ok("Just text, <b> and a < sign.")
    assert ok("Let me look." + call) and ok(call) and ok(call + " Done.")
    assert ok("Hmm.</think>Sure." + call, reasoning=True)
    assert ok(time_call)  # not strict: any arguments
    assert ok(call + "\n" + time_call)  # a second block (DSML) or call (GLM), several allowed
    assert not ok("Let me look." + call.replace("Oslo", "Rome"))  # outside the strict tool's enum
    assert not ok(call.replace("get_weather", "get_wind"))  # no such tool
    assert not ok(call + time_call, several=False)  # parallel_tool_calls false: one call


def test_one_dsml_block_holds_several_calls(tokenizers: dict[str, str]) -> None:
    """Forced (required, parallel) or strict under auto. The forced grammar refused a block's second call: after a
    call its newline was lexed as the start of the block's end and the lexer does not backtrack."""
    invoke = lambda call: call.split("function_calls>\n")[1].split(f"\n</{D}function_calls>")[0]  # noqa: E731
    block = lambda *calls: (f"\n\n<{D}function_calls>\n" + "\n".join(map(invoke, calls))  # noqa: E731
                            + f"\n</{D}function_calls>")
    path = tokenizers["deepseekv32"]
    twice = block(DSML_CALL, DSML_CALL.replace("Oslo", "Paris"))
    assert accepts(path, "deepseekv32", Constraint(forced_tools=TOOLS), twice)
    assert not accepts(path, "deepseekv32", Constraint(forced_tools=TOOLS, several_calls=False), twice)
    assert accepts(path, "deepseekv32", Constraint(strict_tools=STRICT), "Two." + block(DSML_CALL, DSML_TIME))
    assert not accepts(path, "deepseekv32", Constraint(strict_tools=STRICT, several_calls=False),
                       block(DSML_CALL, DSML_TIME))


@pytest.mark.parametrize("tool_format", FORMATS)
def test_an_answer_format_beside_strict_tools_is_the_answer_or_calls(tokenizers: dict[str, str],
                                                                     tool_format: str) -> None:
    _, _, call, _ = FORMATS[tool_format]
    path = tokenizers[tool_format]
    for c, answer in ((Constraint(regex="(yes|no)", strict_tools=STRICT), "yes"),
                      (Constraint(ebnf='root ::= "up" | "down"', strict_tools=STRICT), "down"),
                      (Constraint(response_format={"type": "json_object"}, strict_tools=STRICT), '{"a": 1}')):
        assert accepts(path, tool_format, c, answer) and accepts(path, tool_format, c, call)
        assert not accepts(path, tool_format, c, "maybe") and not accepts(path, tool_format, c, answer + call)
        assert not accepts(path, tool_format, c, call.replace("Oslo", "Rome"))


def test_without_a_strict_tool_auto_is_unconstrained() -> None:
    assert plan_tools(TOOLS, "auto").strict is None
    plan = plan_tools(STRICT, "auto")
    assert plan.strict == STRICT and [t["function"]["name"] for t in plan.bound] == ["get_weather"]
    assert plan_tools(STRICT, "required").strict is None  # forced: every tool is held anyway


def test_past_the_choices_a_grammar_follows_strict_tools_are_refused() -> None:
    """A strict tool holds every call: a call chooses among all the tools at one position (1,000 at most)."""
    many = [{"type": "function", "function": {"name": f"g{i}"}} for i in range(MAX_FORCED_CHOICES)] + STRICT[:1]
    with pytest.raises(ValueError, match=f"tools holds {MAX_FORCED_CHOICES + 1} functions and a strict one"):
        check_held_calls(plan_tools(many, "auto"))
    check_held_calls(plan_tools(many[1:], "auto"))


def test_a_strict_tools_schema_is_checked_under_auto() -> None:
    bad = copy.deepcopy(STRICT)
    bad[0]["function"]["parameters"]["properties"]["days"] = {"type": "x"}
    with pytest.raises(ValueError, match=r"tools\[0\].function.parameters of 'get_weather' is not a valid JSON "
                                         "schema for a strict call"):
        check_held_calls(plan_tools(bad, "auto"))
    loose = copy.deepcopy(bad)
    del loose[0]["function"]["strict"]
    check_held_calls(plan_tools(loose, "auto"))  # not strict: only shown to the model
    bad[1]["function"]["parameters"]["properties"] = {"x": {"type": "x"}}
    bad[0]["function"]["parameters"]["properties"]["days"] = {"type": "integer"}
    check_held_calls(plan_tools(bad, "auto"))  # (the tool that is not strict is never compiled)


def test_a_loose_call_is_the_formats_argument_markup(tokenizers: dict[str, str]) -> None:
    """A tool that is not strict takes any names and values, in its format's markup: free text there carried a
    whole block with a strict call past its schema, and markup the parser gives back as content. Whatever the
    grammar takes, the parser reads as calls."""
    bad_weather = DSML_CALL.replace("Oslo", "Rome")
    smuggled = DSML_TIME.replace(f'<{D}parameter name="zone" string="true">UTC</{D}parameter>\n',
                                 bad_weather.split("\n\n", 1)[1].replace(f"</{D}invoke>", "", 1))
    cases = {"deepseekv32": ([DSML_TIME, DSML_TIME.replace("UTC", "5").replace('"true"', '"false"'),
                              DSML_TIME.replace(f'<{D}parameter name="zone" string="true">UTC</{D}parameter>\n', "\n")],
                             [smuggled, DSML_TIME.replace(f'<{D}parameter name="zone" string="true">UTC</{D}parameter>',
                                                          "garbage")]),
             "glm47": ([GLM_TIME, "<tool_call>get_time</tool_call>"],
                       ["<tool_call>get_timeX</tool_call>", "<tool_call>get_time garbage</tool_call>",
                        "<tool_call>get_time<arg_key>zone</tool_call>"])}
    for tool_format, (good, bad) in cases.items():
        path = tokenizers[tool_format]
        for text in good:
            assert accepts(path, tool_format, Constraint(strict_tools=STRICT), text), text
            assert [c.name for c in parse_all(tool_format, text).calls] == ["get_time"], text
        for text in bad:
            assert not accepts(path, tool_format, Constraint(strict_tools=STRICT), text), text


def parse_all(tool_format: str, text: str) -> Parsed:
    parser = OutputParser(None, tool_parser(tool_format, STRICT))
    return parser.feed(text).add(parser.finish())


@pytest.mark.parametrize("tool_format", FORMATS)
def test_no_call_hides_in_the_reasoning(tokenizers: dict[str, str], tool_format: str) -> None:
    """Without a reasoning parser the tool parser reads the reasoning too: a call written there, past its schema,
    was a call. The reasoning before held calls (strict or forced) may not open one."""
    _, _, call, _ = FORMATS[tool_format]
    inside = "Let me call " + call.replace("Oslo", "Rome") + " hmm</think>"
    path = tokenizers[tool_format]
    for c in (Constraint(strict_tools=STRICT), Constraint(forced_tools=STRICT)):
        assert accepts(path, tool_format, c, "Hmm.</think>" + call, reasoning=True)
        assert not accepts(path, tool_format, c, inside + call, reasoning=True)


def test_without_a_grammar_backend_strict_tools_are_parsed_not_held(tmp_path_factory: pytest.TempPathFactory) -> None:
    """--grammar-backend none: a strict tool under auto is served (its calls parsed, not held: the Agents SDK
    sends every function tool strict, and these requests were refused); an answer format is still a 400."""
    path = chat_cases.chat_checkpoint(tmp_path_factory, "deepseek_v32", "deepseek_v32")
    with ServerProcess(path, tmp_path_factory.mktemp("srv") / "server.log", grammar_backend="none",
                       max_total_tokens=4096) as server:
        body = {"model": "default", "messages": chat_cases.ASK, "max_tokens": 4, "tools": STRICT}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        fmt = {"type": "json_object"}
        r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "response_format": fmt}, timeout=60)
        assert r.status_code == 400 and "--grammar-backend none" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "response_format"


@pytest.mark.parametrize("tool_format", FORMATS)
def test_markup_inside_an_answer_is_its_text(tool_format: str) -> None:
    """Beside an answer format the reply is the answer or calls: a call written inside the answer (a regex's
    text, a JSON string) is the answer's text, not a call its grammar never held; calls opening the reply are
    calls. Fed whole and a character at a time."""
    _, _, call, _ = FORMATS[tool_format]
    bad = call.replace("Oslo", "Rome")
    for text, calls in (("ok " + bad, []), ('{"a": "' + bad.replace('"', "'") + '"}', []), (call, ["get_weather"])):
        for pieces in ([text], list(text)):
            parser = OutputParser(None, tool_parser(tool_format, STRICT, calls_first=True))
            out = Parsed()
            for piece in pieces:
                out.add(parser.feed(piece))
            out.add(parser.finish())
            assert [c.name for c in out.calls] == calls and out.content == ("" if calls else text), (text, out)
    assert [c.name for c in parse_all(tool_format, "ok " + bad).calls] == ["get_weather"]  # (no answer format)
