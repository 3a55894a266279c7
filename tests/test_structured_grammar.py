"""Grammar state without a server: the forced-call grammar in each model's format accepts a valid call
(after reasoning when the prompt opens it) and rejects a wrong one; the mask after drafts leaves the state as it was."""
from __future__ import annotations

import json

import pytest
import torch

from chat_cases import TOOLS
from dsaserve.chat.constrain import MARKUP_TEXTS, Constraint, build_grammar, markup_for
from dsaserve.chat.grammar import (MAX_OPEN_PROPERTIES, GrammarError, GrammarSpec, GrammarState, ebnf_grammar,
                                   json_grammar, ll_tokenizer)
from dsaserve.chat.tools import MAX_FORCED_CHOICES, check_held_calls, plan_tools
from dsaserve.engine.tokenizer import Tokenizer
from dsaserve.tiny import make_tiny_model, save_tokenizer

D = "｜DSML｜"
DSML_CALL = (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">'
             f'Oslo</{D}parameter>\n<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>\n'
             f'</{D}function_calls>')
GLM_CALL = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value><arg_key>days</arg_key>" \
           "<arg_value>3</arg_value></tool_call>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("grammar")
    return {fmt: str(save_tokenizer(make_tiny_model(root / fmt, arch), fmt))
            for arch, fmt in (("deepseek_v32", "deepseek_v32"), ("glm_moe_dsa", "glm5"))}


def state(path: str, constraint: Constraint, tool_format: str | None, opens_reasoning: bool) -> GrammarState:
    tok = Tokenizer(path)
    markup = markup_for(tok.hf, ll_tokenizer(path, (1,)), MARKUP_TEXTS)
    return GrammarState(GrammarSpec(build_grammar(constraint, tool_format, markup, opens_reasoning), path, (1,)),
                        len(tok.hf))


def feed(st: GrammarState, ids: list[int]) -> bool:
    for t in ids:
        if not bool(st.allowed()[t]) or not st.accept(t):
            return False
    return True


@pytest.mark.parametrize("fmt,tool_format,call,reasoning", [
    ("deepseek_v32", "deepseekv32", DSML_CALL, ""), ("deepseek_v32", "deepseekv32", DSML_CALL, "Hmm <b>.</think>"),
    ("glm5", "glm47", GLM_CALL, ""), ("glm5", "glm47", GLM_CALL, "Hmm <b>.</think>")])
def test_forced_call_grammar(tiny: dict[str, str], fmt: str, tool_format: str, call: str, reasoning: str) -> None:
    hf = Tokenizer(tiny[fmt]).hf
    make = lambda: state(tiny[fmt], Constraint(forced_tools=TOOLS[:1], several_calls=False), tool_format,  # noqa: E731
                         bool(reasoning))
    st = make()
    assert feed(st, hf.encode(reasoning + call, add_special_tokens=False)) and st.is_terminated
    assert st.allowed().nonzero().flatten().tolist() == [1]  # complete: EOS only
    wrong = make()  # a city outside the enum
    assert not feed(wrong, hf.encode(reasoning + call.replace("Oslo", "Rome"), add_special_tokens=False))


def test_the_mask_after_drafts_leaves_the_state_where_it_was(tiny: dict[str, str]) -> None:
    """allowed_after(drafts) is the mask of a state that took them; the state itself goes on from where it was."""
    path = tiny["deepseek_v32"]
    hf = Tokenizer(path).hf
    spec = GrammarSpec(json_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
                       path, (1,))
    st, took = GrammarState(spec, len(hf)), GrammarState(spec, len(hf))
    first = st.allowed().clone()
    ids = hf.encode('{"a": 4', add_special_tokens=False)
    assert feed(took, ids) and torch.equal(st.allowed_after(ids), took.allowed())
    assert torch.equal(st.allowed(), first)
    assert feed(st, hf.encode('{"a": 42}', add_special_tokens=False)) and st.is_terminated


def test_drafts_in_a_grammar_that_cannot_roll_back(tiny: dict[str, str]) -> None:
    """A client's Lark with a max_tokens lexeme: llguidance refuses to roll such a grammar back, and the mask after
    MTP drafts was made by consuming and rolling back (a RuntimeError that failed every request of the step)."""
    path = tiny["deepseek_v32"]
    hf = Tokenizer(path).hf
    st = GrammarState(GrammarSpec(ebnf_grammar("start: foo\nfoo[max_tokens=2]: /[a-z]+/"), path, (1,)), len(hf))
    first = st.allowed().clone()
    ids = hf.encode("bc", add_special_tokens=False)
    st.allowed_after(ids)
    assert torch.equal(st.allowed(), first) and st.failure() is None


@pytest.mark.parametrize("regex", ["a/b", r"a\/b", r"[/]b?", r"a\\/?"])
def test_regex_slashes_escaped_or_not(tiny: dict[str, str], regex: str) -> None:
    """A slash in a client's regex, escaped by the client (\\/) or not, means a slash: Lark's /.../ delimiters
    get each unescaped one escaped, and an escaped one is left alone (it was escaped twice: a lexer error)."""
    import re

    path = tiny["deepseek_v32"]
    hf = Tokenizer(path).hf
    text = next(t for t in ("a/b", "/b", "/", "a\\/", "a\\") if re.fullmatch(regex, t))
    st = state(path, Constraint(regex=regex), None, False)
    assert feed(st, hf.encode(text, add_special_tokens=False)) and st.is_terminated


@pytest.mark.parametrize("constraint", [
    Constraint(regex="a <tool_call> b</think>"), Constraint(ebnf='start: "a " "<tool_call>" " b" "</think>"'),
    Constraint(response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "object", "properties": {"s": {"const": "a <tool_call> b</think>"}}, "required": ["s"]}}})])
def test_a_user_grammar_may_spell_glm_markup_as_text(tiny: dict[str, str], constraint: Constraint) -> None:
    """GLM's markup (`<tool_call>`, `</think>`) are added tokens that its tokenizer treats as text: a user grammar
    that spells them takes the tokens the tokenizer makes of that text, which are not special to the grammar
    (llguidance's own conversion marked every added token special: the mask offered the token, then the grammar
    refused it); EOS only once the text is complete."""
    path = tiny["glm5"]
    hf = Tokenizer(path).hf
    text = "a <tool_call> b</think>"
    text = text if constraint.response_format is None else '{"s": "' + text + '"}'
    ids = hf.encode(text, add_special_tokens=False)
    assert hf.convert_tokens_to_ids("<tool_call>") in ids  # (the markup is one token here)
    st = state(path, constraint, None, False)
    assert feed(st, ids) and st.is_terminated and st.allowed().nonzero().flatten().tolist() == [1]


def test_a_user_grammar_may_spell_a_special_tokens_text(tiny: dict[str, str]) -> None:
    """A special token's text (GLM's `<|user|>`) in a user grammar is text: spelled in pieces, never the special
    token (it was offered, then refused: "the output constraint failed")."""
    path = tiny["glm5"]
    hf = Tokenizer(path).hf
    special = hf.convert_tokens_to_ids("<|user|>")
    assert hf.added_tokens_decoder[special].special
    st = state(path, Constraint(regex="x <\\|user\\|> y"), None, False)
    assert feed(st, hf.encode("x ", add_special_tokens=False)) and not bool(st.allowed()[special])
    pieces = hf.encode("<|user|> y", add_special_tokens=False, split_special_tokens=True)
    assert special not in pieces and feed(st, pieces) and st.is_terminated


SCHEMA_TOOL = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "$defs": {"Unit": {"type": "string", "enum": ["c", "f"]}},
    "properties": {"unit": {"$ref": "#/$defs/Unit"}, "code": {"type": "string", "pattern": "^[0-9]{3}$"},
                   "kind": {"type": "string", "const": "abc"}, "tag": {"type": "string", "pattern": "x[0-9]"}},
    "required": ["unit", "code", "kind", "tag"]}}}]
GOOD = {"unit": '"c"', "code": "123", "kind": "abc", "tag": "zz x7 y"}
BAD = [("unit", '"k"'), ("code", "1234"), ("code", "12a"), ("kind", "abd"), ("tag", "zz y")]


def schema_call(tool_format: str, values: dict[str, str]) -> str:
    if tool_format == "deepseekv32":
        params = "".join(f'<{D}parameter name="{k}" string="{"false" if k == "unit" else "true"}">{v}</{D}parameter>\n'
                         for k, v in values.items())
        return f'\n\n<{D}function_calls>\n<{D}invoke name="f">\n{params}</{D}invoke>\n</{D}function_calls>'
    args = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in values.items())
    return f"<tool_call>f{args}</tool_call>"


@pytest.mark.parametrize("fmt,tool_format", [("deepseek_v32", "deepseekv32"), ("glm5", "glm47")])
def test_forced_call_arguments_follow_refs_patterns_and_consts(tiny: dict[str, str], fmt: str,
                                                               tool_format: str) -> None:
    """A parameter schema's `$ref` to the root's `$defs` compiles (it was a 400: each argument's schema was
    compiled without them), and a string argument keeps its `pattern` (anywhere in the value unless anchored)
    and `const` (both were dropped: any text passed)."""
    hf = Tokenizer(tiny[fmt]).hf
    make = lambda: state(tiny[fmt], Constraint(forced_tools=SCHEMA_TOOL, several_calls=False), tool_format,  # noqa: E731
                         False)
    st = make()
    assert feed(st, hf.encode(schema_call(tool_format, GOOD), add_special_tokens=False)) and st.is_terminated
    for key, value in BAD:
        st = make()
        accepted = feed(st, hf.encode(schema_call(tool_format, {**GOOD, key: value}), add_special_tokens=False))
        assert not (accepted and st.is_terminated), (key, value)


def wide_tools(shape: str, choices: int) -> list[dict]:
    """Forced tools whose grammar offers `choices` alternatives at one position; the call to make is f(a=...)."""
    def fn(name: str, props: dict, required: list[str]) -> dict:
        return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props,
                                                                              "required": required}}}
    a = {"a": {"type": "string", "maxLength": 8}}
    if shape == "tools":
        return [fn(f"g{i}", a, ["a"]) for i in range(choices - 1)] + [fn("f", a, ["a"])]
    if shape == "optional":
        return [fn("f", {**a, **{f"o{i}": {"type": "integer"} for i in range(choices // 2)}}, ["a"])]
    return [fn("f", {"a": {"type": "string", "enum": [f"v{i}" for i in range(choices)]}}, ["a"])]


@pytest.mark.parametrize("shape", ["tools", "optional", "enum"])
@pytest.mark.parametrize("fmt,tool_format", [("deepseek_v32", "deepseekv32"), ("glm5", "glm47")])
def test_forced_calls_are_refused_up_front_past_what_the_grammar_follows(tiny: dict[str, str], fmt: str,
                                                                          tool_format: str, shape: str) -> None:
    """llguidance fails a request mid-reply when one position offers over 2000 choices (3,000 forced tools did, after
    the server accepted them): at MAX_FORCED_CHOICES a call parses, the next one or more calls still open; past it
    the tools check refuses the request, naming the field."""
    hf = Tokenizer(tiny[fmt]).hf
    forced = wide_tools(shape, MAX_FORCED_CHOICES)
    st = state(tiny[fmt], Constraint(forced_tools=forced, several_calls=True), tool_format, False)
    call = schema_call(tool_format, {"a": f"v{MAX_FORCED_CHOICES - 1}" if shape == "enum" else "Oslo"})
    assert feed(st, hf.encode(call * (2 if tool_format == "glm47" else 1), add_special_tokens=False)), shape
    assert st.failure() is None and (st.is_terminated or bool(st.allowed()[1]))
    choice = "required" if shape == "tools" else {"type": "function", "function": {"name": "f"}}
    check_held_calls(plan_tools(forced, choice))
    with pytest.raises(ValueError, match=r"^tools\S* (holds 1002 functions|has 501 optional|has 1002 values)"):
        check_held_calls(plan_tools(wide_tools(shape, MAX_FORCED_CHOICES + 2), choice))


def test_a_json_object_with_more_open_properties_than_the_parser_follows_is_refused(tiny: dict[str, str]) -> None:
    """llguidance's parser holds about 4 items per optional property in the row after an object's `{`, 2000 at most:
    a response_format object of 499 optional properties failed at its first token, after the server took it. At
    MAX_OPEN_PROPERTIES the object parses; one more is refused when the grammar is built (a 400), nested too."""
    def schema(n: int) -> dict:
        return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema(MAX_OPEN_PROPERTIES)}}
    st = state(tiny["deepseek_v32"], Constraint(response_format=fmt), None, False)
    hf = Tokenizer(tiny["deepseek_v32"]).hf
    assert feed(st, hf.encode('{"p0": 1, "p7": 2}', add_special_tokens=False)) and st.failure() is None
    markup = markup_for(hf, ll_tokenizer(tiny["deepseek_v32"], (1,)), MARKUP_TEXTS)
    for wide in (schema(MAX_OPEN_PROPERTIES + 1), {"type": "object", "properties": {
            "inner": {"anyOf": [schema(MAX_OPEN_PROPERTIES + 1), {"type": "null"}]}}}):
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": wide}}
        with pytest.raises(GrammarError, match=f"leaves {MAX_OPEN_PROPERTIES + 1} properties optional"):
            build_grammar(Constraint(response_format=fmt), None, markup, False)


REF_TOOL = [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/definitions/Args", "definitions": {
    "Args": {"type": "object", "properties": {"html": {"type": "string", "pattern": "^<[a-z]+>$"},
                                              "n": {"type": "integer"}}, "required": ["html", "n"]}}}}}]


@pytest.mark.parametrize("fmt,tool_format,reasoning", [
    ("deepseek_v32", "deepseekv32", ""), ("glm5", "glm47", ""), ("generic", "deepseekv32", "if a<b: </b>.</think>"),
    ("generic", "glm47", "if a<b: </b>.</think>")])
def test_forced_call_through_a_root_ref_with_angle_brackets(tiny: dict[str, str], tmp_path, fmt: str,
                                                            tool_format: str, reasoning: str) -> None:
    """Parameters behind a root `$ref` are followed (the call was forced to have none), and a raw string
    argument or the reasoning before the call may hold '<' (a pattern that needs one had an empty language:
    values and reasoning stopped at the first '<'). The generic tokenizer spells every tag as plain text."""
    path = tiny[fmt] if fmt in tiny else str(save_tokenizer(make_tiny_model(tmp_path / fmt), fmt))
    hf = Tokenizer(path).hf
    make = lambda: state(path, Constraint(forced_tools=REF_TOOL, several_calls=False), tool_format,  # noqa: E731
                         bool(reasoning))
    for values, valid in (({"html": "<em>", "n": "3"}, True), ({"html": "em", "n": "3"}, False),
                          ({"html": "<em>"}, False)):
        call = schema_call(tool_format, values).replace('name="n" string="true"', 'name="n" string="false"')
        st = make()
        accepted = feed(st, hf.encode(reasoning + call, add_special_tokens=False)) and st.is_terminated
        assert accepted == valid, (values, reasoning)


def test_a_root_that_combines_schemas_is_refused_for_a_forced_call(tiny: dict[str, str]) -> None:
    tool = [{"type": "function", "function": {"name": "f", "parameters": {
        "anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}}]}}}]
    with pytest.raises(GrammarError, match="cannot follow its parameters' 'anyOf'"):
        state(tiny["deepseek_v32"], Constraint(forced_tools=tool), "deepseekv32", False)


def test_a_draft_past_the_tokenizer_is_only_a_rejected_draft(tiny: dict[str, str]) -> None:
    """A model's vocabulary may be padded past its tokenizer (DeepSeek-V3.2: 129,280 against about 128.8K ids):
    an MTP draft there (drafts are unconstrained) put the matcher into its error state, and the request ended
    with "the output constraint failed" over a token the model never sampled."""
    path = tiny["deepseek_v32"]
    hf = Tokenizer(path).hf
    st = GrammarState(GrammarSpec(json_grammar({"type": "object"}), path, (1,)), len(hf) + 128)
    brace = hf.encode("{", add_special_tokens=False)
    after_brace = st.allowed_after(brace)
    assert torch.equal(st.allowed_after(brace + [len(hf) + 10]), after_brace)
    assert torch.equal(st.allowed_after([len(hf) + 10]), st.allowed())
    assert st.failure() is None and feed(st, hf.encode('{"a": 1}', add_special_tokens=False)) and st.is_terminated


@pytest.mark.parametrize("grammar,text", [('start: "a::=b" | "c"', "a::=b"), ('root ::= "x" | "y"', "y"),
                                          ('# rules\n  root ::= [0-9]+ "::="', "42::=")])
def test_ebnf_is_gbnf_only_where_a_line_defines_a_rule(tiny: dict[str, str], grammar: str, text: str) -> None:
    """A Lark grammar whose string holds "::=" was taken for GBNF (a 400); GBNF rules still convert."""
    path = tiny["deepseek_v32"]
    st = state(path, Constraint(ebnf=grammar), None, False)
    assert feed(st, Tokenizer(path).hf.encode(text, add_special_tokens=False)) and st.is_terminated


@pytest.mark.parametrize("schema", [{"type": "string", "pattern": "x[0-9]"}, {"type": "string", "minLength": 8}])
def test_a_raw_value_never_holds_its_closing_tag(tmp_path, schema: dict) -> None:
    """A value whose pattern or length was not met at its closing tag ran on through the tag: the grammar took a
    call that the parser, which ends the value at its first closing tag, reads as no call."""
    path = str(save_tokenizer(make_tiny_model(tmp_path / "g"), "generic"))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": schema}, "required": ["a"]}}}]
    st = state(path, Constraint(forced_tools=tools, several_calls=False), "glm47", False)
    call = "<tool_call>f<arg_key>a</arg_key><arg_value>zz</arg_value> x7 abcdef</arg_value></tool_call>"
    assert not (feed(st, Tokenizer(path).hf.encode(call, add_special_tokens=False)) and st.is_terminated)


def glm_markup_as_special_tokens(tmp_path) -> str:
    """A GLM tokenizer whose call markup (and </think>) are special added tokens, as some GLM tokenizers hold
    them."""
    path = save_tokenizer(make_tiny_model(tmp_path / "special", "glm_moe_dsa"), "glm5")
    spec = json.loads((path / "tokenizer.json").read_text())
    for added in spec["added_tokens"]:
        added["special"] = added["special"] or added["content"] in MARKUP_TEXTS
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return str(path)


def test_a_raw_value_never_spells_a_special_closing_tag(tmp_path) -> None:
    """Where `</arg_value>` is a special token, a value could still spell its text in pieces (`</`, `arg`, ...):
    the grammar took it, and the parser, which reads text, ended the value there."""
    path = glm_markup_as_special_tokens(tmp_path)
    hf = Tokenizer(path).hf
    end = hf.convert_tokens_to_ids("</arg_value>")
    assert hf.added_tokens_decoder[end].special
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}]

    def call(value: str) -> list[int]:
        head = hf.encode("<tool_call>f<arg_key>a</arg_key><arg_value>", add_special_tokens=False)
        tail = hf.encode("</arg_value></tool_call>", add_special_tokens=False)
        return head + hf.encode(value, add_special_tokens=False, split_special_tokens=True) + tail

    good, spelled = call("zz x7"), call("zz</arg_value> x7")
    assert end in good and good.count(end) == spelled.count(end) == 1  # the spelled tag is pieces, not the token
    st = state(path, Constraint(forced_tools=tools, several_calls=False), "glm47", False)
    assert feed(st, good) and st.is_terminated
    st = state(path, Constraint(forced_tools=tools, several_calls=False), "glm47", False)
    assert not feed(st, spelled)


def test_equal_grammars_compile_once_and_each_state_moves_alone(tiny: dict[str, str], monkeypatch) -> None:
    """Each request's state compiled its grammar anew on the leader, inside its step loop: a 10,000-property schema
    takes about a second there, so one request with n = 16 stalled every other stream for 16 seconds. Equal specs
    (as each request unpickles its own) now share one compiled matcher, of which each state advances a copy."""
    import llguidance
    path = tiny["deepseek_v32"]
    hf = Tokenizer(path).hf
    grammar = json_grammar({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    made, real = [], llguidance.LLMatcher
    monkeypatch.setattr(llguidance, "LLMatcher", lambda *args, **kw: made.append(1) or real(*args, **kw))
    states = [GrammarState(GrammarSpec(grammar, path, (1,)), len(hf)) for _ in range(4)]
    assert len(made) <= 1
    assert feed(states[0], hf.encode('{"n": 1}', add_special_tokens=False)) and states[0].is_terminated
    assert not states[1].is_terminated and feed(states[1], hf.encode('{"n": 23}', add_special_tokens=False))
    assert states[1].is_terminated and not states[2].is_terminated


def test_a_forced_dsml_call_without_arguments_is_written_as_the_encoding_writes_it(tiny: dict[str, str]) -> None:
    """DeepSeek's encoding writes a call's parameters between newlines after the invoke tag (`invoke name="f">\\n` +
    parameters + `\\n</invoke>`), so a call that gives none of its optional parameters has an empty line there; the
    grammar closed the invoke right after the first newline."""
    tool = {"type": "function", "function": {"name": "ls", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}, "depth": {"type": "integer"}}}}}
    hf = Tokenizer(tiny["deepseek_v32"]).hf
    depth = f'<{D}parameter name="depth" string="false">2</{D}parameter>\n'
    for params, valid in (("\n", True), (depth, True), ("", False)):
        st = state(tiny["deepseek_v32"], Constraint(forced_tools=[tool], several_calls=False), "deepseekv32", False)
        call = f'\n\n<{D}function_calls>\n<{D}invoke name="ls">\n{params}</{D}invoke>\n</{D}function_calls>'
        assert (feed(st, hf.encode(call, add_special_tokens=False)) and st.is_terminated) == valid, params


MIXED = {"type": "function", "function": {"name": "find", "parameters": {
    "type": "object", "$defs": {"Code": {"type": "string"}}, "properties": {
        "zip": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]}, "tag": {"type": ["string", "null"]},
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]}, "code": {"$ref": "#/$defs/Code"},
        "version": {"enum": ["1", "2", 3]}}, "required": ["zip", "tag"]}}}


@pytest.mark.parametrize("arguments,valid", [({"zip": "10001", "tag": "true", "limit": 3}, True),
                                             ({"zip": None, "tag": None, "code": "123"}, True),
                                             ({"zip": "1", "tag": "1", "version": 3}, True),
                                             ({"zip": "100011", "tag": "x"}, False),  # over the string's maxLength
                                             ({"zip": "1", "tag": "1", "version": "4"}, False)])  # not in the enum
def test_a_forced_call_may_write_a_string_raw_where_the_schema_also_allows_other_types(
        tiny: dict[str, str], arguments: dict, valid: bool) -> None:
    """Both formats write a string argument raw (GLM's template: `<arg_value>10001</arg_value>`; DSML: string="true")
    and anything else as JSON, whatever else the parameter's schema allows: a forced call of a string-or-null
    parameter (an enum of strings, a $ref to a string) refused the raw string, the form the prompts' own calls have
    (it allowed only a quoted JSON string). The string keeps its branch's constraints; null still goes as JSON."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from dsaserve.chat import dsv32
    from dsaserve.chat.glm_template import GLM_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "find", "arguments": arguments}}]}]
    rendered = render_jinja_template([messages], tools=[MIXED], chat_template=GLM_CHAT_TEMPLATE)[0][0]
    glm_call = rendered[rendered.index("<tool_call>find"):rendered.rindex("</tool_call>") + len("</tool_call>")]
    dsml_call = f"\n\n{dsv32.CALLS_START}\n{dsv32.render_invoke(messages[1]['tool_calls'][0])}\n{dsv32.CALLS_END}"
    for fmt, tool_format, call in (("glm5", "glm47", glm_call), ("deepseek_v32", "deepseekv32", dsml_call)):
        hf = Tokenizer(tiny[fmt]).hf
        st = state(tiny[fmt], Constraint(forced_tools=[MIXED], several_calls=False), tool_format, False)
        assert (feed(st, hf.encode(call, add_special_tokens=False)) and st.is_terminated) == valid, (fmt, call)


READ_AS_JSON = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "v": {"enum": ["1", "2", 3]}, "n": {"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 10}]},
    "s": {"type": ["string", "null"], "minLength": 2}}}}}


@pytest.mark.parametrize("arguments,parsed", [  # parsed: the arguments the schema asks for (None: refused)
    ('<arg_key>v</arg_key><arg_value>2</arg_value>', None),  # the integer 2 as GLM's parser reads it: not in the enum
    ('<arg_key>v</arg_key><arg_value>"2"</arg_value>', {"v": "2"}),
    ('<arg_key>n</arg_key><arg_value>5</arg_value>', None),  # the integer 5: under the minimum
    ('<arg_key>n</arg_key><arg_value>"5"</arg_value>', {"n": "5"}),
    ('<arg_key>n</arg_key><arg_value>12</arg_value>', {"n": 12}),
    ('<arg_key>s</arg_key><arg_value>""</arg_value>', None),  # read as JSON: the empty string, under minLength
    ('<arg_key>s</arg_key><arg_value>["x</arg_value>', None),  # read as JSON: it scanned past its closing tag
    ('<arg_key>s</arg_key><arg_value>ab</arg_value>', {"s": "ab"})])
def test_a_glm_raw_string_never_reads_as_json(tiny: dict[str, str], arguments: str, parsed: dict | None) -> None:
    """GLM writes a string raw and anything else as JSON, and its parser reads a value as JSON where the schema
    allows more than a string: a forced call's raw string may not be text the parser reads as JSON (a JSON string,
    array or object, or a scalar of a type the schema allows), so what was written is what is parsed, and fits
    the schema (random walks through the grammar found each refused case parsed to arguments that did not)."""
    from dsaserve.chat.parsers import OutputParser, tool_parser
    call = f"<tool_call>f{arguments}</tool_call>"
    hf = Tokenizer(tiny["glm5"]).hf
    st = state(tiny["glm5"], Constraint(forced_tools=[READ_AS_JSON], several_calls=False), "glm47", False)
    assert (feed(st, hf.encode(call, add_special_tokens=False)) and st.is_terminated) == (parsed is not None)
    if parsed is not None:  # what the parser reads is what was written
        out = OutputParser(None, tool_parser("glm47", [READ_AS_JSON], forced=True))
        assert json.loads(out.feed(call).add(out.finish()).calls[0].arguments) == parsed



@pytest.mark.parametrize("value,valid", [("123", True), ("١٢٣", False), ("12a", False)])
@pytest.mark.parametrize("fmt,tool_format", [("deepseek_v32", "deepseekv32"), ("glm5", "glm47")])
def test_a_raw_values_pattern_reads_digits_as_json_schema_does(tiny: dict[str, str], fmt: str, tool_format: str,
                                                                value: str, valid: bool) -> None:
    """A pattern's \\d is ECMA-262's [0-9] in a raw string value too (the grammar's regexes read it as any Unicode
    digit: `١٢٣` passed there while the JSON path and the schema refuse it)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "^\\d{3}$"}}, "required": ["code"]}}}]
    if tool_format == "glm47":
        call = f"<tool_call>f<arg_key>code</arg_key><arg_value>{value}</arg_value></tool_call>"
    else:
        call = (f'\n\n<{D}function_calls>\n<{D}invoke name="f">\n<{D}parameter name="code" string="true">{value}'
                f'</{D}parameter>\n</{D}invoke>\n</{D}function_calls>')
    hf = Tokenizer(tiny[fmt]).hf
    st = state(tiny[fmt], Constraint(forced_tools=tools, several_calls=False), tool_format, False)
    assert (feed(st, hf.encode(call, add_special_tokens=False)) and st.is_terminated) == valid


@pytest.mark.parametrize("name,key", [("f", " k"), ("f ", "k")])
def test_a_glm_name_with_outer_whitespace_is_refused_for_a_held_call(tiny: dict[str, str], name: str, key: str) -> None:
    """GLM's parser strips a call's name and keys (as GLM's own parsers do), so a forced call of a tool named `f `
    or with a property ` k` would parse to another name or key: such a call is refused when its grammar is built,
    naming it (a random walk found the required ` k` missing from every parsed call)."""
    tools = [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {key: {"type": "integer"}}, "required": [key]}}}]
    with pytest.raises(GrammarError, match="drops the whitespace around names and keys"):
        state(tiny["glm5"], Constraint(forced_tools=tools, several_calls=False), "glm47", False)


@pytest.mark.parametrize("schema", [{"type": "string", "pattern": "^[a-z]{2,5}$", "maxLength": 1},
                                    {"type": "string", "format": "date", "maxLength": 3},
                                    {"type": "integer", "minimum": 5, "maximum": 1}])
@pytest.mark.parametrize("fmt,tool_format", [("deepseek_v32", "deepseekv32"), ("glm5", "glm47")])
def test_an_optional_parameter_that_no_value_fits_is_left_out(tiny: dict[str, str], fmt: str, tool_format: str,
                                                              schema: dict) -> None:
    """An optional parameter whose schema no value fits is left out of a held call, as llguidance's JSON grammar
    leaves such a property out of an object: a raw string's was offered, and a model that opened it found no value it
    could begin (NoExtensionBias); a JSON one's failed the grammar's build."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "x": schema}, "required": ["a"]}}}]
    if tool_format == "glm47":
        call, end = "<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value>", "</tool_call>"
        opened = "<arg_key>x</arg_key><arg_value>"
    else:
        call = f'\n\n<{D}function_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" string="false">1</{D}parameter>\n'
        end, opened = f"</{D}invoke>\n</{D}function_calls>", f'<{D}parameter name="x" string="'
    hf = Tokenizer(tiny[fmt]).hf
    make = lambda: state(tiny[fmt], Constraint(forced_tools=tools, several_calls=False), tool_format,  # noqa: E731
                         False)
    st = make()
    assert feed(st, hf.encode(call + end, add_special_tokens=False)) and st.is_terminated
    assert not feed(make(), hf.encode(call + opened, add_special_tokens=False))


def test_a_one_of_the_grammar_cannot_follow_names_the_tool_and_parameter(tiny: dict[str, str]) -> None:
    """A oneOf whose branches may overlap (an integer is a number) cannot be held to exactly one of them: llguidance
    refused it as the grammar was built, in a message naming a line of that grammar; the error names the tool and
    the parameter. A oneOf whose branches llguidance proves disjoint is followed (as anyOf)."""
    def tools(one_of: list[dict]) -> list[dict]:
        return [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"n": {"oneOf": one_of}}, "required": ["n"]}}}]
    hf = Tokenizer(tiny["glm5"]).hf
    held = lambda one_of: Constraint(forced_tools=tools(one_of), several_calls=False)  # noqa: E731
    with pytest.raises(GrammarError, match="'f': the schema of parameter 'n' .*oneOf branches may overlap"):
        state(tiny["glm5"], held([{"type": "integer"}, {"type": "number"}]), "glm47", False)
    st = state(tiny["glm5"], held([{"type": "integer"}, {"type": "null"}]), "glm47", False)
    call = "<tool_call>f<arg_key>n</arg_key><arg_value>7</arg_value></tool_call>"
    assert feed(st, hf.encode(call, add_special_tokens=False)) and st.is_terminated


def test_a_constraint_no_text_meets_says_so(tiny: dict[str, str]) -> None:
    """A regex of no string ([^\\s\\S]) compiles; the first step finds no token it allows, and the request ended
    with llguidance's bare "NoExtensionBias". Its failure now says what it means."""
    st = state(tiny["glm5"], Constraint(regex="[^\\s\\S]"), None, False)
    assert st.allowed().nonzero().flatten().tolist() == [1]  # (EOS alone: an error state lets the request end)
    st.accept(1)
    assert "the constraint can never be met (" in (st.failure() or ""), st.failure()
