"""Reasoning and tool-call parsers: known outputs parsed whole and split at every point (two and three
pieces), malformed markup kept as content, and tool_choice resolution."""
from __future__ import annotations

import json

import pytest

from dsaserve.chat.parsers import (DsmlToolParser, GlmToolParser, OutputParser, Parsed, ReasoningSplitter,
                                   ToolCall)
from dsaserve.chat.tools import check_held_calls, plan_tools

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "code": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
D = "｜DSML｜"


def dsml(reasoning: bool) -> OutputParser:
    return OutputParser(ReasoningSplitter(starts_inside=True) if reasoning else None, DsmlToolParser(TOOLS))


def glm(reasoning: bool) -> OutputParser:
    return OutputParser(ReasoningSplitter(starts_inside=True) if reasoning else None, GlmToolParser(TOOLS))


def parse(make, text: str, cuts: tuple[int, ...] = (), cut_off: bool = False) -> Parsed:
    """cut_off: max_tokens or a stop string ended the text (else the model's own end)."""
    parser, out, prev = make(), Parsed(), 0
    for cut in (*cuts, len(text)):
        out.add(parser.feed(text[prev:cut]))
        prev = cut
    return out.add(parser.finish(cut_off))


DSML_TWO = (f'Checking two.</think>Let me look.\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n'
            f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
            f'<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>\n'
            f'<{D}invoke name="get_time">\n\n</{D}invoke>\n</{D}function_calls>')
GLM_TWO = ("Checking two.</think>Let me look.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris"
           "</arg_value><arg_key>days</arg_key><arg_value>3</arg_value><arg_key>code</arg_key><arg_value>007"
           "</arg_value></tool_call>\n<tool_call>get_time</tool_call>")
# (parser, raw output, expected reasoning, content, calls)
KNOWN = [
    (dsml, DSML_TWO, "Checking two.", "Let me look.",
     [ToolCall("get_weather", '{"city": "Paris", "days": 3}'), ToolCall("get_time", "{}")]),
    (glm, GLM_TWO, "Checking two.", "Let me look.",  # (the newline between the calls is no content)
     [ToolCall("get_weather", '{"city": "Paris", "days": 3, "code": "007"}'), ToolCall("get_time", "{}")]),
    (dsml, f'Odd.</think><{D}function_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="days" '
     f'string="false">three</{D}parameter>\n</{D}invoke>\n</{D}function_calls>', "Odd.", "",
     [ToolCall("get_weather", '{"days": "three"}')]),  # string="false" but no JSON: its text (as SGLang takes it)
    (dsml, "No tools.</think>Just <think> text <｜DSML｜ and \n\n done", "No tools.",
     "Just <think> text <｜DSML｜ and \n\n done", []),
    (glm, "Unclosed reasoning <tool_call>get_time</tool_call>", "Unclosed reasoning <tool_call>get_time</tool_call>",
     "", []),
]


@pytest.mark.parametrize("make,raw,reasoning,content,calls", KNOWN)
def test_every_split_point_gives_the_same_message(make, raw: str, reasoning: str, content: str,
                                                  calls: list[ToolCall]) -> None:
    expected = Parsed(reasoning, content, calls)
    assert parse(lambda: make(True), raw) == expected
    for a in range(len(raw) + 1):
        assert parse(lambda: make(True), raw, (a,)) == expected, a
        for b in range(a, len(raw) + 1, 5):
            assert parse(lambda: make(True), raw, (a, b)) == expected, (a, b)


@pytest.mark.parametrize("inside", [True, False])
@pytest.mark.parametrize("raw", ["Checking two.</think>Let me look.", "<think>Never closed", "Plain", "<thi"])
def test_whole_reasoning_comes_in_one_piece_at_every_split(raw: str, inside: bool) -> None:
    """stream_reasoning false: at every two split points the reasoning comes out as one piece, and the message
    equals the piecewise splitter's."""
    expected = parse(lambda: OutputParser(ReasoningSplitter(inside), None), raw)
    for a in range(len(raw) + 1):
        for b in range(a, len(raw) + 1):
            parser = OutputParser(ReasoningSplitter(inside, whole=True), None)
            parts = [parser.feed(raw[:a]), parser.feed(raw[a:b]), parser.feed(raw[b:]), parser.finish()]
            pieces = [part.reasoning for part in parts if part.reasoning]
            assert pieces == ([expected.reasoning] if expected.reasoning else []), (a, b)
            assert "".join(part.content for part in parts) == expected.content, (a, b)


def test_one_character_pieces() -> None:
    assert parse(lambda: dsml(True), DSML_TWO, tuple(range(len(DSML_TWO)))) == parse(lambda: dsml(True), DSML_TWO)


MALFORMED_DSML = [
    f'<{D}function_calls>\n<{D}invoke name="launch_rockets">\n</{D}invoke>\n</{D}function_calls>',  # unknown tool
    f'<{D}function_calls>\ngarbage</{D}function_calls>',
    f'<{D}function_calls>\n<{D}invoke name="get_time">\n',  # cut short
    f'\n\n<{D}function_calls>\n</{D}function_calls>',  # no call in it (it vanished)
]


@pytest.mark.parametrize("raw", MALFORMED_DSML)
def test_malformed_dsml_stays_content(raw: str) -> None:
    text = "Before. " + raw + " after"
    expected = Parsed("", text, [])
    for a in range(len(text) + 1):
        assert parse(lambda: dsml(False), text, (a,)) == expected


def test_valid_call_then_malformed_one() -> None:
    bad = f'<{D}invoke name="get_weather">\n<{D}parameter name="x" string="maybe">1</{D}parameter>\n</{D}invoke>\n'
    raw = f'\n\n<{D}function_calls>\n<{D}invoke name="get_time">\n\n</{D}invoke>\n{bad}</{D}function_calls>'
    expected = Parsed("", "\n" + bad + f"</{D}function_calls>", [ToolCall("get_time", "{}")])  # text kept whole
    for a in range(len(raw) + 1):
        assert parse(lambda: dsml(False), raw, (a,)) == expected


@pytest.mark.parametrize("raw", [
    "<tool_call>get_weather<arg_value>1</arg_value></tool_call>",  # value without key
    "<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",  # no name
    "<tool_call>get_weather<arg_key>a</arg_key><arg_value>1</arg_value>junk</tool_call>",
    "<tool_call>nope</tool_call>",  # unknown tool
    "<tool_call>get_weather<arg_key>city",  # cut short
])
def test_malformed_glm_stays_content(raw: str) -> None:
    text = "a " + raw + " b"
    for a in range(len(text) + 1):
        assert parse(lambda: glm(False), text, (a,)) == Parsed("", text, [])


def test_reasoning_opened_by_the_reply() -> None:
    def make() -> OutputParser:
        return OutputParser(ReasoningSplitter(starts_inside=False), None)
    raw = "<think>plan</think>answer"
    for a in range(len(raw) + 1):
        assert parse(make, raw, (a,)) == Parsed("plan", "answer", [])
    assert parse(make, "<thin") == Parsed("", "<thin", [])  # not a marker after all: content


def test_arguments_are_json_objects() -> None:
    out = parse(lambda: glm(False), GLM_TWO.split("</think>")[1])
    assert [json.loads(c.arguments) for c in out.calls] == [{"city": "Paris", "days": 3, "code": "007"}, {}]


@pytest.mark.parametrize("value,parsed", [("1e999", "1e999"), ("-1e400", "-1e400"), ("NaN", "NaN"),
                                          ("[1, Infinity]", "[1, Infinity]"), ("2.5e3", 2500.0),
                                          ("12345678901234567890", 12345678901234567890),
                                          ('"\\ud800"', '"\\ud800"'), ('["a", "\\udc00x"]', '["a", "\\udc00x"]'),
                                          ('"\\ud83d\\ude00"', "\U0001F600")])
def test_arguments_are_json_where_a_value_is_representable(value: str, parsed: object) -> None:
    """A JSON number past a double's range (which a JSON grammar allows) read as inf and came back as `Infinity` in
    the arguments, which is no JSON (JavaScript's JSON.parse refused them); NaN / Infinity literals likewise. A
    lone surrogate's escape decoded to a string no UTF-8 response can carry (a 500 after the whole generation).
    Such a value is its text, as any value that is no JSON; a surrogate pair is its character."""
    dsml_call = (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="days" string="false">'
                 f'{value}</{D}parameter>\n</{D}invoke>\n</{D}function_calls>')
    glm_call = f"<tool_call>get_weather<arg_key>days</arg_key><arg_value>{value}</arg_value></tool_call>"
    for make, text in ((lambda: dsml(False), dsml_call), (lambda: glm(False), glm_call)):
        [call] = parse(make, text).calls
        strict = json.loads(call.arguments, parse_constant=lambda name: pytest.fail(f"{name} in {call.arguments}"))
        assert strict == {"days": parsed}
        call.arguments.encode("utf-8")


@pytest.mark.parametrize("fmt", ["dsml", "glm"])
def test_a_key_given_twice_keeps_its_last_value(fmt: str) -> None:
    """A call whose arguments are free (tool_choice auto, a tool not strict) may give a key twice: its last value
    stands, in the key's first place, as json.loads reads such an object and SGLang's and vLLM's parsers read such a
    call, streamed or whole (the call went to the content as malformed markup)."""
    values = (("days", "false", "1"), ("city", "true", "Oslo"), ("days", "false", "2"))
    if fmt == "dsml":
        params = "".join(f'<{D}parameter name="{k}" string="{s}">{v}</{D}parameter>\n' for k, s, v in values)
        text = f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n{params}</{D}invoke>\n</{D}function_calls>'
    else:
        text = "<tool_call>get_weather" + "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>"
                                                  for k, _, v in values) + "</tool_call>"
    expected = Parsed("", "", [ToolCall("get_weather", '{"days": 2, "city": "Oslo"}')])
    for a in range(len(text) + 1):
        assert parse(lambda: dsml(False) if fmt == "dsml" else glm(False), text, (a,)) == expected


@pytest.mark.parametrize("choice,expected", [
    (None, ("auto", 2)), ("none", ("none", 0)), ("auto", ("auto", 2)), ("required", ("required", 2)),
    ({"type": "function", "function": {"name": "get_time"}}, ("get_time", 2)),
])
def test_tool_choice(choice, expected) -> None:
    plan = plan_tools(TOOLS, choice)
    assert (plan.choice, len(plan.tools)) == expected
    forced = {"required": 2, "get_time": 1}.get(plan.choice)
    assert (len(plan.forced) if plan.forced is not None else None) == forced


@pytest.mark.parametrize("tools,choice,problem", [
    (TOOLS, "sometimes", "tool_choice must be"),
    (TOOLS, {"type": "function", "function": {"name": "missing"}}, "not in tools"),
    (None, "required", "needs tools"),
    ([{"type": "function", "function": {}}], None, r"tools\[0\].function.name"),
    (TOOLS + TOOLS[:1], None, "given twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/$defs/A"}}}], None,
     r"\$ref '#/\$defs/A' must name a schema inside these parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/$defs/A", "$defs": {
        "A": {"type": "array"}}}}}], None, "of type object"),
    # a forced call's schema its grammar cannot be built from is named (required dumped the grammar); keywords
    # llguidance cannot enforce are valid (uniqueItems)
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "foo"}, "b": {"type": "array", "uniqueItems": True}}}}}], "required",
     r"tools\[0\].function.parameters of 'f' is not a valid JSON schema for a forced call: Invalid type: foo"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"$ref": "#/$defs/B"}}}}}], {"type": "function", "function": {"name": "f"}},
     "Pointer '/\\$defs/B' does not exist"),
    # "yes" is not true: it was read as not strict, silently (OpenAI answers 400)
    ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "auto",
     r"tools\[0\].function.strict must be a boolean, got 'yes'"),
])
def test_bad_tools_name_the_problem(tools, choice, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_held_calls(plan_tools(tools, choice))


def test_schemas_a_grammar_cannot_enforce_are_welcome_unless_a_call_is_forced() -> None:
    """Valid JSON schemas llguidance does not read (a look-around pattern, as zod writes for emails; a null bound
    inside an anyOf) are shown to the model under auto and none; forcing a call of such a tool is a 400 naming it."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "email": {"type": "string", "pattern": "^(?!\\.)[^@]+@[^@]+$"},
        "note": {"anyOf": [{"type": "string", "maxLength": None}, {"type": "null"}]}}}}}]
    for choice in (None, "auto", "none"):
        check_held_calls(plan_tools(tools, choice))
    with pytest.raises(ValueError, match="is not a valid JSON schema for a forced call"):
        check_held_calls(plan_tools(tools, "required"))


def test_glm_arguments_of_a_boolean_property_schema() -> None:
    """JSON Schema allows `true` (any value) as a property's schema, and the tools check accepts it: the GLM
    parser reads such an argument as JSON (it raised on the schema's missing dict)."""
    from dsaserve.chat.tools import plan_tools

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                           "properties": {"x": True, "y": True}}}}]
    parser = OutputParser(None, GlmToolParser(plan_tools(tools, "auto").tools))
    done = parser.feed("<tool_call>f<arg_key>x</arg_key><arg_value>1</arg_value><arg_key>y</arg_key>"
                       "<arg_value>hi</arg_value></tool_call>")
    done.add(parser.finish())
    assert [(c.name, json.loads(c.arguments)) for c in done.calls] == [("f", {"x": 1, "y": "hi"})]


@pytest.mark.parametrize("ref,defs", [("#/$defs/A~1B", {"$defs": {"A/B": {"type": "object", "properties": {
    "code": {"type": "string"}}}}}), ("#/$defs/Outer/$defs/Args", {"$defs": {"Outer": {"$defs": {"Args": {
        "type": "object", "properties": {"code": {"type": "string"}}}}}}})])
def test_a_root_ref_is_a_json_pointer(ref: str, defs: dict) -> None:
    """`~1` stands for '/' and a pointer may go deeper than one definition (both were refused)."""
    from dsaserve.chat.tools import parameters_of
    assert parameters_of({"parameters": {"$ref": ref, **defs}})["properties"] == {"code": {"type": "string"}}


def test_glm_arguments_under_a_root_ref() -> None:
    """Parameters given as a `$ref` at the root (zod-to-json-schema writes them so) are read through it: a
    string property's value stays text (it was parsed as JSON: "42" became 42)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/definitions/Args",
        "definitions": {"Args": {"type": "object", "properties": {"code": {"type": "string"}}}}}}}]
    parser = OutputParser(None, GlmToolParser(plan_tools(tools, "auto").tools))
    done = parser.feed("<tool_call>f<arg_key>code</arg_key><arg_value>42</arg_value></tool_call>")
    done.add(parser.finish())
    assert [(c.name, json.loads(c.arguments)) for c in done.calls] == [("f", {"code": "42"})]


SCRIPT_TOOL = [{"type": "function", "function": {"name": "run", "parameters": {
    "type": "object", "properties": {"spec": {"type": "object"}, "lines": {"type": "array"}}}}}]
# JSON arguments whose strings hold each format's closing tags as text (a tool that writes markup)
SPEC = {"html": f"</{D}parameter></{D}invoke></{D}function_calls></arg_value></tool_call>", "n": [1, "]}"]}
LINES = ["a\\\"</arg_value>", "{"]


@pytest.mark.parametrize("fmt", ["dsml", "glm"])
def test_closing_tags_inside_a_json_argument(fmt: str) -> None:
    """The value of a JSON argument ends where its JSON ends, not at the first closing tag in its text
    (such a call came back as content, though the forced-call grammar allows it)."""
    spec, lines = json.dumps(SPEC, ensure_ascii=False), json.dumps(LINES)
    if fmt == "dsml":
        raw = (f'Go.\n\n<{D}function_calls>\n<{D}invoke name="run">\n<{D}parameter name="spec" string="false">'
               f'{spec}</{D}parameter>\n<{D}parameter name="lines" string="false">{lines}</{D}parameter>\n'
               f'</{D}invoke>\n</{D}function_calls> done')
        make = lambda: OutputParser(None, DsmlToolParser(SCRIPT_TOOL))  # noqa: E731
    else:
        raw = (f"Go.<tool_call>run<arg_key>spec</arg_key><arg_value>{spec}</arg_value>"
               f"<arg_key>lines</arg_key><arg_value>{lines}</arg_value></tool_call> done")
        make = lambda: OutputParser(None, GlmToolParser(SCRIPT_TOOL))  # noqa: E731
    for a in range(0, len(raw) + 1, 3):
        out = parse(make, raw, (a,))
        assert (out.content, [(c.name, json.loads(c.arguments)) for c in out.calls]) == \
            ("Go. done", [("run", {"spec": SPEC, "lines": LINES})]), a


@pytest.mark.parametrize("fmt", ["dsml", "glm"])
@pytest.mark.parametrize("opened", ["[1,", '"3'])
def test_an_unclosed_json_argument_does_not_swallow_the_rest(fmt: str, opened: str) -> None:
    """A non-string argument that opens a JSON array / object and never closes it, then the closing tag: the
    value ends at that tag (markup outside a JSON string is not JSON), so what follows (text, a later valid
    call) is parsed as usual instead of being held back until the end and returned as content. An unclosed JSON
    string puts every later tag inside it, so the whole reply came back as content, calls and all: once the reply
    has ended the string will not close, and the value ends at its first closing tag too (until then the string
    may still close, with the tags inside it: the block waits for the reply's end)."""
    if fmt == "dsml":
        bad = (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="days" string="false">'
               f'{opened}</{D}parameter>\n</{D}invoke>\n</{D}function_calls>')
        good = f'\n\n<{D}function_calls>\n<{D}invoke name="get_time">\n</{D}invoke>\n</{D}function_calls>'
        make = dsml
    else:
        bad = f"<tool_call>get_weather<arg_key>days</arg_key><arg_value>{opened}</arg_value></tool_call>"
        good = "<tool_call>get_time</tool_call>"
        make = glm
    # a value that is not JSON is text (as for any other non-JSON value)
    value = json.dumps({"days": opened}, ensure_ascii=False)
    expected = Parsed("", "ab", [ToolCall("get_weather", value), ToolCall("get_time", "{}")])
    raw = "a" + bad + "b" + good
    for a in range(0, len(raw) + 1, 7):
        assert parse(lambda: make(False), raw, (a,)) == expected, a


def test_a_raw_newline_ends_a_would_be_json_string_at_once() -> None:
    """No JSON string holds a raw control character: an argument's "string" that meets one is not JSON, so the
    call is returned as soon as its closing tag arrives, not held until the reply's end."""
    raw = '<tool_call>get_weather<arg_key>days</arg_key><arg_value>"a\nb</arg_value></tool_call>'
    assert glm(False).feed(raw).calls == [ToolCall("get_weather", json.dumps({"days": '"a\nb'}))]


@pytest.mark.parametrize("fmt", ["dsml", "glm"])
@pytest.mark.parametrize("tags_in_a_string", [False, True])
def test_a_streamed_call_is_parsed_once_its_end_tag_arrives(fmt: str, tags_in_a_string: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A call streamed in small pieces is parsed when its closing tag is there, not again from its start at
    every piece (a 23K-character argument in 4-character pieces took 113 s of the server's event loop); the
    result equals the call parsed whole. So too when the argument's first JSON string holds the closing tags as
    text: they end nothing, so they must not make every later piece parse the call again (6,230 parses)."""
    import dsaserve.chat.parsers as parsers
    markup = f"</{D}parameter></{D}invoke></{D}function_calls>" if fmt == "dsml" else "</arg_value></tool_call>"
    lines = json.dumps([markup] * tags_in_a_string + [f"line {i}" for i in range(2000)], ensure_ascii=False)
    attempts = [0]

    def counted(parse_element):
        def wrapper(*args):
            attempts[0] += 1
            return parse_element(*args)
        return wrapper

    if fmt == "dsml":
        raw = (f'Go.\n\n<{D}function_calls>\n<{D}invoke name="run">\n<{D}parameter name="lines" string="false">'
               f'{lines}</{D}parameter>\n</{D}invoke>\n</{D}function_calls>')
        make = lambda: OutputParser(None, DsmlToolParser(SCRIPT_TOOL))  # noqa: E731
        monkeypatch.setattr(parsers, "_dsml_invoke", counted(parsers._dsml_invoke))
    else:
        raw = f"Go.<tool_call>run<arg_key>lines</arg_key><arg_value>{lines}</arg_value></tool_call>"
        make = lambda: OutputParser(None, GlmToolParser(SCRIPT_TOOL))  # noqa: E731
        monkeypatch.setattr(GlmToolParser, "_element", counted(GlmToolParser._element))
    out = parse(make, raw, tuple(range(4, len(raw), 4)))
    assert (out.content, [(c.name, json.loads(c.arguments)) for c in out.calls]) == \
        ("Go.", [("run", {"lines": json.loads(lines)})])
    assert attempts[0] <= 3, f"the call was parsed {attempts[0]} times over {len(raw) // 4} pieces"


@pytest.mark.parametrize("make,raw,content,calls", [(m, r, c, k) for m, r, _, c, k in KNOWN[:2]])
def test_parallel_tool_calls_false_returns_the_first_call(make, raw: str, content: str, calls: list) -> None:
    """parallel_tool_calls false (OpenAI: at most one call): a reply of two calls gives the first, whole or
    streamed, and the second is dropped, not returned as content."""
    parser_class = DsmlToolParser if make is dsml else GlmToolParser
    one = lambda: OutputParser(ReasoningSplitter(starts_inside=True), parser_class(TOOLS, max_calls=1))  # noqa: E731
    for cuts in ((), tuple(range(1, len(raw)))):
        out = parse(one, raw, cuts)
        assert (out.content, out.calls) == (content, calls[:1])


@pytest.mark.parametrize("make,raw,calls", [(m, r, k) for m, r, _, _, k in KNOWN[:2]])
def test_whitespace_around_calls_is_no_content(make, raw: str, calls: list) -> None:
    """A reply of calls alone, with the newlines models write around them: content empty (null in the message;
    both formats render an assistant turn's calls without them), whole or streamed."""
    reply = "Checking two.</think>\n" + raw.split("Let me look.")[1] + "\n\n"
    for cuts in ((), tuple(range(1, len(reply)))):
        assert parse(lambda: make(True), reply, cuts) == Parsed("Checking two.", "", calls)


def test_an_argument_nested_past_the_recursion_limit_does_not_fail_the_stream() -> None:
    """Model output is not bounded: JSON nested deeper than Python's parser recurses raised RecursionError out of
    the parser (the request failed mid-stream). Both formats keep the value as text, as they do for any argument
    that is not JSON."""
    deep = "[" * 5000 + "]" * 5000
    for got in (parse(lambda: dsml(False), f'<{D}function_calls>\n<{D}invoke name="get_weather">\n<{D}parameter '
                      f'name="city" string="false">{deep}</{D}parameter>\n</{D}invoke>\n</{D}function_calls>'),
                parse(lambda: glm(False), f"<tool_call>get_weather<arg_key>city</arg_key><arg_value>{deep}"
                      "</arg_value></tool_call>")):
        assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [("get_weather", {"city": deep})]


@pytest.mark.parametrize("make,raw,reasoning,content,calls", KNOWN[:2])
def test_a_cut_after_complete_calls_drops_the_cut_call(make, raw: str, reasoning: str, content: str,
                                                       calls: list[ToolCall]) -> None:
    """max_tokens or a stop string can end a reply after a complete call, inside the next one, the marker opening
    it or DSML's closing tag: the complete calls stand and what was written of the cut call is no content, whole or
    streamed (a cut inside DSML's second invoke left e.g. '\\n<｜DSML｜invok' in content; SGLang and vLLM drop the
    unfinished call). A reply cut inside its first call keeps the markup as text, and text after calls keeps its
    trailing whitespace."""
    end = "</tool_call>" if make is glm else f"</{D}invoke>"
    first_end, last_end = raw.index(end) + len(end), raw.rindex(end) + len(end)
    for keep in range(first_end, len(raw)):
        expected = Parsed(reasoning, content, calls[:1] if keep < last_end else calls)
        for cuts in ((), (keep // 2,), tuple(range(first_end - 3, keep, 5))):
            assert parse(lambda: make(True), raw[:keep], cuts, cut_off=True) == expected, (keep, cuts)
    inside = raw[:raw.index("Paris")]
    assert parse(lambda: make(True), inside, cut_off=True) == Parsed(reasoning, inside.split("</think>")[1], [])
    assert parse(lambda: make(True), raw + " Done.\n") == Parsed(reasoning, content + " Done.\n", calls)


GARBLED = [  # (format, text, where the first piece ends, cut off, the call's arguments whole)
    (glm, '<tool_call>get_weather<arg_key>days</arg_key><arg_value>["</arg_value></tool_call>", <x]</arg_value>'
          '</tool_call>', 86, False, {"days": '["</arg_value></tool_call>", <x]'}),
    (dsml, f'<{D}function_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="days" string="false">'
           f'["</{D}parameter></{D}invoke>", <x]</{D}parameter>\n</{D}invoke>\n</{D}function_calls>', 140, False,
     {"days": f'["</{D}parameter></{D}invoke>", <x]'}),
    (dsml, f'<{D}function_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">see '
           f'</{D}invoke></{D}parameter>\n<{D}parameter name="a>b" string="true">v</{D}parameter>\n</{D}invoke>\n'
           f'</{D}function_calls>', 163, False, {"city": f"see </{D}invoke>", "a>b": "v"}),
    (dsml, f'<{D}function_calls>\n<{D}invoke name="get_time">\n</{D}invoke>\n<{D}invoke name="x</{D}function_calls>'
           'y">', 114, True, {}),
]


@pytest.mark.parametrize("make,text,piece,cut_off,arguments", GARBLED)
def test_garbled_markup_parses_the_same_streamed(make, text: str, piece: int, cut_off: bool, arguments: dict) -> None:
    """Markup a model may garble, where a piece ends: a `<` outside a JSON string (the value was called no JSON
    before the rest came, and the stream ended it at a closing tag written inside an earlier string), a `>` in a
    quoted name (the tag was malformed before its quote closed). The pieces give what the whole text gives: one
    call, no content (found by fuzzing streams against whole replies)."""
    whole = parse(lambda: make(False), text, (), cut_off)
    assert whole.content == "" and [json.loads(c.arguments) for c in whole.calls] == [arguments]
    assert text[piece - 1] in "<>" and parse(lambda: make(False), text, (piece,), cut_off) == whole


def test_a_head_with_an_unclosed_quote_ends_no_later_call() -> None:
    """A garbled invoke head whose name never closes its quote is malformed where the next quote does not end it
    (its name ends at its first quote, as the pattern reads it): its block is text and a later call parses, whole and
    streamed (reading quotes as pairs over the rest of the reply made every later `>` quoted: no later call)."""
    bad = f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather>\n</{D}invoke>\n</{D}function_calls>'
    good = (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">'
            f'Paris</{D}parameter>\n</{D}invoke>\n</{D}function_calls>')
    text = "Intro." + bad + "\nThen more text." + good + "\nDone."
    whole = parse(lambda: dsml(False), text)
    call = ToolCall("get_weather", '{"city": "Paris"}')
    assert whole == Parsed("", "Intro." + bad + "\nThen more text.\nDone.", [call])
    for cut in range(1, len(text), 5):
        assert parse(lambda: dsml(False), text, (cut,)) == whole, cut


@pytest.mark.parametrize("parser_class", [DsmlToolParser, GlmToolParser])
def test_a_forced_reply_keeps_reasoning_no_parser_split(parser_class) -> None:
    """Forced, with no reasoning parser (none configured, or separate_reasoning false) the reasoning the prompt
    opened reaches the tool parser as text: it stays content before the call, whole and streamed."""
    call = ToolCall("get_weather", '{"city": "Paris"}')
    markup = (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">'
              f'Paris</{D}parameter>\n</{D}invoke>\n</{D}function_calls>' if parser_class is DsmlToolParser else
              "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>")
    text = "The user wants the weather.</think>" + markup
    for cuts in ((), tuple(range(3, len(text), 9))):
        got = parse(lambda: OutputParser(None, parser_class(TOOLS, forced=True)), text, cuts)
        assert got == Parsed("", "The user wants the weather.</think>", [call]), cuts


@pytest.mark.parametrize("make,raw,reasoning,content,calls", KNOWN[:2])
def test_a_forced_call_cut_inside_is_no_content(make, raw: str, reasoning: str, content: str,
                                                calls: list[ToolCall]) -> None:
    """tool_choice required / named: the reply is calls alone (its grammar), so what max_tokens left of a first call
    (or of its opening marker) is no content, whole or streamed, also where the cut fell inside a character of the
    marker (the detokenizer's U+FFFD for its bytes made the held-back marker text); unforced, such a reply keeps
    its text."""
    parser_class = DsmlToolParser if make is dsml else GlmToolParser
    reply = raw.split("Let me look.")[1]  # calls alone, as the forced grammar writes them
    first_end = reply.index("Paris")
    for keep, unfinished in [(2, ""), (8, ""), (first_end, ""), (3, "\ufffd"), (first_end, "\ufffd")]:
        text = reply[:keep] + unfinished
        for forced in (True, False):
            def one() -> OutputParser:
                return OutputParser(None, parser_class(TOOLS, forced=forced))
            for cuts in ((), tuple(range(1, len(text)))):
                got = parse(one, text, cuts, cut_off=True)
                assert got == (Parsed("", "", []) if forced else Parsed("", text, [])), (keep, forced)
    whole = parse(lambda: OutputParser(None, parser_class(TOOLS, forced=True)), reply, cut_off=True)
    assert whole.calls == calls and whole.content == ""


@pytest.mark.parametrize("make,raw,reasoning,content,calls", KNOWN[:2])
def test_text_after_calls_that_could_open_a_marker_stays_at_the_models_own_end(make, raw: str, reasoning: str,
                                                                               content: str,
                                                                               calls: list[ToolCall]) -> None:
    """Text after the calls that ends like the start of a marker ("x <") is held back while it may be one; where the
    model ended the reply itself it is content, where max_tokens or a stop string cut it, a cut marker."""
    for tail in (" Is x <", " the tag <tool" if make is glm else f" a <{D[:3]}"):
        assert parse(lambda: make(True), raw + tail) == Parsed(reasoning, content + tail, calls), tail
        assert parse(lambda: make(True), raw + tail, cut_off=True) == Parsed(
            reasoning, content + tail[:tail.index("<")], calls), tail
