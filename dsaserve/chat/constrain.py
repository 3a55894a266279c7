"""Grammars for one request: response_format / regex / ebnf, or a forced tool call written in the model's
own tool-call format (DSML for DeepSeek-V3.2, <tool_call> markup for GLM), so that even a random-weight
model emits a call that parses and whose arguments fit the tool's parameter schema.

Grammars are Lark text for llguidance. Fixed markup that the tokenizer holds as one special token is written
`<[id]>`, which is how llguidance matches special tokens; markup it holds as an added token that is text (GLM-5's
`<arg_key>`, `</think>`: `"special": false`) is written as text, whose forced bytes llguidance has the tokenizer
turn into that one token (grammar.ll_tokenizer). When the prompt opens a reasoning block, the grammar first lets
the reasoning run to `</think>`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from dsaserve.chat import dsv32
from dsaserve.chat.formats import format_regex
from dsaserve.chat.grammar import (JSON_STYLE, GrammarError, check_open_properties, check_schema_depth,
                                   ebnf_grammar, json_schema_problem, schema_of)
from dsaserve.chat.tools import allowed_types, is_strict, parameters_of, resolve_ref

THINK_END = "</think>"
# Fixed markup that a tokenizer may hold as single (special or text) added tokens.
MARKUP_TEXTS = (THINK_END, "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
_RAW_KEYWORDS = ("type", "const", "enum", "minLength", "maxLength", "pattern", "format")  # what _text_value follows


@dataclass(frozen=True)
class Markup:
    """How fixed text is written in a grammar for one tokenizer."""
    special: dict[str, int]  # text -> id of the single special token that spells it

    def lit(self, text: str) -> str:
        return f"<[{self.special[text]}]>" if text in self.special else json.dumps(text, ensure_ascii=False)


def single_token(hf: Any, text: str) -> int | None:
    """The id of the one token of the tokenizer that spells `text`, or None."""
    tid = hf.convert_tokens_to_ids(text)
    return tid if isinstance(tid, int) and tid != hf.unk_token_id and hf.decode([tid]) == text else None


def markup_for(hf: Any, ll_tok: Any, texts: tuple[str, ...]) -> Markup:
    ids = {text: single_token(hf, text) for text in texts}
    return Markup({text: tid for text, tid in ids.items() if tid is not None and ll_tok.is_special_token(tid)})


def json_rule(schema: dict[str, Any]) -> str:
    check_schema_depth(schema)
    check_open_properties(schema)
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


def _text_value(schema: dict[str, Any], markup: Markup, name: str, end: str, rules: list[str],
                excluded: str | None = None, json_read: str | None = None) -> str:
    """A raw (unquoted) string argument and its closing markup `end`: its const or one of its enum values, else
    text of its length that matches its pattern and format (the regexes' intersection), ending at the first `end`,
    as the parser reads it (an llguidance `suffix` lexeme, or a terminal before a special-token `end`).
    excluded: text the value may not spell (the markup that opens calls, in text before them). json_read: a regex
    of the whole values the parser reads as JSON, which the raw string may not be (_json_read)."""
    if isinstance(schema.get("const"), str):
        return f"{markup.lit(schema['const'])} {markup.lit(end)}"
    if isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]):
        return "(" + " | ".join(markup.lit(v) for v in schema["enum"]) + f") {markup.lit(end)}"
    lo, hi = int(schema.get("minLength") or 0), schema.get("maxLength")  # (null: absent, as tools.py reads it)
    text = f"/(?s:.{{{lo},{int(hi)}}})/" if hi is not None else (f"/(?s:.{{{lo},}})/" if lo else "/(?s:.*)/")
    if isinstance(schema.get("pattern"), str):
        text += f" & /{_slashes_escaped(_whole_value_regex(_ascii_classes(schema['pattern'])))}/"
    if isinstance(schema.get("format"), str):
        text += f" & /{_slashes_escaped(format_regex(schema['format']))}/"
    if excluded is not None:
        text += _not_holding(excluded)
    if json_read is not None:
        text += f" & ~/{_slashes_escaped(json_read)}/"
    # the value may not hold `end` (the lexeme runs past an `end` where its pattern or length is not met yet), nor
    # spell a special `end` in pieces: the parser reads text and would cut it there
    text += _not_holding(end)
    if end in markup.special:
        rules.append(f"{name.upper()}: {text}")  # (a terminal: & joins terminals only)
        return f"{name.upper()} {markup.lit(end)}"
    rules.append(f"{name}[suffix={json.dumps(end, ensure_ascii=False)}]: {text}")
    return name


def _json_read(schema: dict[str, Any], root: dict[str, Any]) -> str:
    """The raw values GLM's parser reads as JSON for a parameter whose schema allows more than a string, by how
    they start: a JSON string, array or object (the scan reads it as JSON, past closing tags in its strings),
    and, where the schema allows a number, a number (the string "2" of enum ["1", "2", 3] reads as the integer 2).
    Such a string is written as JSON instead (quoted), which the parser reads back as that string. (A whole
    raw value cannot be excluded instead: the grammar's lexer then refused the JSON branch's same text.)"""
    ws, allowed = "[ \\t\\n\\r]*", allowed_types(schema, root) or {"number"}
    starts = '"\\[{' + ("0-9-" if allowed & {"integer", "number"} else "")
    return f"{ws}[{starts}](?s:.*)"


def _unread_values(branch: dict[str, Any], json_read: str) -> dict[str, Any] | None:
    """The raw string branch without the const / enum values that read as JSON; None if none is left."""
    values = [branch["const"]] if "const" in branch else branch.get("enum")
    if not isinstance(values, list):
        return branch
    kept = [v for v in values if not (isinstance(v, str) and re.fullmatch(json_read, v))]
    rest = {k: v for k, v in branch.items() if k not in ("const", "enum")}
    return {**rest, "enum": kept} if kept else None


def _not_holding(text: str) -> str:
    """A regex term (joined with &) for text that does not spell `text` anywhere."""
    return f" & ~/(?s:.*){_slashes_escaped(re.escape(text))}(?s:.*)/"


_ASCII = {"d": "0-9", "w": "A-Za-z0-9_"}  # JSON Schema's regexes are ECMA-262's: \d and \w are ASCII


def _ascii_classes(pattern: str) -> str:
    r"""A JSON-schema pattern with \d \D \w \W as the ASCII classes ECMA-262 gives them (the grammar's regexes read
    them as Unicode classes: a raw value took digits of other scripts that the JSON path, and the schema, refuse).
    \D and \W inside a bracket class stay as they are."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt.lower() in _ASCII and not (in_class and nxt.isupper()):
                chars = _ASCII[nxt.lower()]
                out.append(chars if in_class else f"[{'^' if nxt.isupper() else ''}{chars}]")
            else:
                out.append(ch + nxt)
            i += 2
            continue
        in_class = True if ch == "[" else False if ch == "]" else in_class
        out.append(ch)
        i += 1
    return "".join(out)


def _whole_value_regex(pattern: str) -> str:
    """A JSON-schema pattern (which may match anywhere in the value) as a regex of the whole value."""
    starts = pattern.startswith("^")
    core = pattern[1:] if starts else pattern
    ends = core.endswith("$") and not core.endswith("\\$")
    core = core[:-1] if ends else core
    return ("" if starts else "(?s:.*)") + f"(?:{core})" + ("" if ends else "(?s:.*)")


def _is_text(schema: dict[str, Any], tool_format: str) -> bool:
    """A string argument written as raw text. DSML writes one with a `format` as JSON (string="false"), which
    the JSON grammar checks; GLM's format has no JSON strings: its raw text is held to the format's regex."""
    return schema.get("type") == "string" and not (tool_format == "deepseekv32" and "format" in schema)


def _params(fn: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, schema, required) of each parameter; each schema carries the root's definitions, which its
    `$ref`s may name (each is compiled alone). A call is written parameter by parameter, so a root that
    combines schemas cannot be followed."""
    params = parameters_of(fn)
    combined = [k for k in ("anyOf", "oneOf", "allOf", "not", "if") if k in params]
    if combined:
        raise GrammarError(f"a forced or strict call of {fn['name']!r} cannot follow its parameters' "
                           f"{combined[0]!r} at the schema's root (give properties)")
    props = params.get("properties") or {}
    required = set(params.get("required") or [])
    defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
    return [(k, {**defs, **v} if isinstance(v, dict) else {}, k in required) for k, v in props.items()]


def _may_give(fn: dict[str, Any], key: str, schema: dict[str, Any], raw: bool, required: bool) -> bool:
    """Whether a call may give parameter `key`, as llguidance's JSON grammar judges its schema (`raw`: the keywords a
    raw string follows): not where no value fits an optional one (JSON leaves such a property out; the grammar
    offered it and its value could not begin, NoExtensionBias). GrammarError naming the tool and the parameter
    where the schema cannot be followed (llguidance's own message named a line of the grammar)."""
    compiled = {k: v for k, v in schema.items() if k in _RAW_KEYWORDS and v is not None} if raw else schema
    check_schema_depth(compiled)  # (before llguidance compiles it: too deep a schema overflows its stack)
    problem = json_schema_problem(json.dumps(compiled, ensure_ascii=False))
    unfit = problem.startswith("Unsatisfiable")
    if unfit and not required:
        return False
    if not problem or raw and not unfit:  # (a raw value's other problems are named as its rule is built)
        return True
    if "oneOf" in problem:  # (llguidance follows a oneOf whose branches it proves disjoint, as anyOf)
        problem = "its oneOf branches may overlap, and a grammar cannot hold a value to exactly one (use anyOf)"
    raise GrammarError(f"{fn['name']!r}: the schema of parameter {key!r} cannot be followed: {problem}")


def _dsml_call(i: int, fn: dict[str, Any], markup: Markup, rules: list[str]) -> str:
    parts = []
    for j, (key, schema, required) in enumerate(_params(fn)):
        forms = []  # (head, value) of each way the encoding may write it: a string raw, anything else as JSON
        text = schema if _is_text(schema, "deepseekv32") else _string_branch(schema, "deepseekv32")
        if not _may_give(fn, key, schema, text is schema, required):
            continue
        if text is not None:
            forms.append((_param_head(key, "true"), _text_value(text, markup, f"t{i}_{j}", dsv32.PARAM_END, rules)))
        if text is not schema:
            rules.append(f"v{i}_{j}: {json_rule(schema)}")
            forms.append((_param_head(key, "false"), f"v{i}_{j} {markup.lit(dsv32.PARAM_END)}"))
        written = " | ".join(f"{markup.lit(h)} {value}" for h, value in forms)
        rules.append(f"p{i}_{j}: ({written}) {markup.lit(chr(10))}")
        parts.append(f"p{i}_{j}" + ("" if required else "?"))
    body = " ".join(parts) if parts else markup.lit("\n")
    if parts and all(part.endswith("?") for part in parts):  # none given: an empty line, as without parameters
        body = f"({_some_of(f'a{i}', [part[:-1] for part in parts], rules)} | {markup.lit(chr(10))})"
    return f"{markup.lit(_invoke_head(fn))} {body} {markup.lit(dsv32.INVOKE_END)}"


def _invoke_head(fn: dict[str, Any]) -> str:
    """A DSML call's opening line as the prompt writes it (checked: no '"' in the name), with the newline before
    it in one lexeme: the grammar's lexer does not backtrack, so a newline of its own, after a call, was taken
    as the start of the block's end ("\\n</") at "\\n<" and a block's second call was refused."""
    return f'\n<{dsv32.DSML}invoke name="{fn["name"]}">\n'


def _param_head(key: str, string: str) -> str:
    return f'<{dsv32.DSML}parameter name="{key}" string="{string}">'


def _some_of(name: str, items: list[str], rules: list[str]) -> str:
    """A rule for one or more of `items`, in their order, in one rule per item (`name_j`: item j then maybe some of
    the later ones, or some of the later ones), where all the subsets written out would be quadratic."""
    for j in reversed(range(len(items))):
        later = f"{name}_{j + 1}" if j + 1 < len(items) else ""
        rules.append(f"{name}_{j}: {items[j]} {later}? | {later}" if later else f"{name}_{j}: {items[j]}")
    return f"{name}_0"


def _glm_call(i: int, fn: dict[str, Any], markup: Markup, rules: list[str]) -> str:
    parts = []
    for name in [fn["name"], *(key for key, _, _ in _params(fn))]:
        if name != name.strip():  # (the parser strips names and keys, as GLM's own parsers do)
            raise GrammarError(f"{fn['name']!r}: a forced or strict GLM call cannot write the name {name!r}: GLM's "
                               "call format drops the whitespace around names and keys")
    for j, (key, schema, required) in enumerate(_params(fn)):
        values = []  # a string raw (as the template writes one), anything else as JSON
        text = schema if _is_text(schema, "glm") else _string_branch(schema, "glm")
        if not _may_give(fn, key, schema, text is schema, required):
            continue
        json_read = None if text is None or text is schema else _json_read(schema, parameters_of(fn))
        raw = text if json_read is None else _unread_values(text, json_read)
        if raw is not None:
            values.append(_text_value(raw, markup, f"t{i}_{j}", "</arg_value>", rules, json_read=json_read))
        if text is not schema:
            rules.append(f"v{i}_{j}: {json_rule(schema)}")
            values.append(f"v{i}_{j} {markup.lit('</arg_value>')}")
        rules.append(f"p{i}_{j}: {markup.lit('<arg_key>')} {markup.lit(key)} {markup.lit('</arg_key>')} "
                     f"{markup.lit('<arg_value>')} ({' | '.join(values)})")
        parts.append(f"p{i}_{j}" + ("" if required else "?"))
    return f"{markup.lit(fn['name'])} {' '.join(parts)} {markup.lit('</tool_call>')}"  # (after <tool_call>)


def _string_branch(schema: dict[str, Any], tool_format: str) -> dict[str, Any] | None:
    """The string alternative of a parameter whose schema allows a string without saying `type: string` (`type:
    [string, null]`, an anyOf / oneOf branch of type string, string values of an enum or const, a local `$ref` to
    any of these), which both formats write raw as their templates do; None if it allows no string."""
    if (schema := resolve_ref(schema)) is None:  # (the JSON rule reports it)
        return None
    types = schema.get("type")
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(values, list) and (types is None or isinstance(types, list) and "string" in types):
        strings = [v for v in values if isinstance(v, str)]
        rest = {k: v for k, v in schema.items() if k not in ("const", "enum", "type")}
        branch = {**rest, "type": "string", "enum": strings} if strings else None
    elif types == "string" or isinstance(types, list) and "string" in types:
        branch = {**schema, "type": "string"}
    else:
        alternatives = schema.get("anyOf") or schema.get("oneOf") or []
        branch = next((b for b in alternatives if isinstance(b, dict) and b.get("type") == "string"), None)
    return branch if branch is not None and _is_text(branch, tool_format) else None


def tool_call_grammar(tools: list[dict[str, Any]], tool_format: str, markup: Markup, several: bool,
                      loose: bool = False) -> list[str]:
    """Lark rules, `calls` first: one (or, if `several`, one or more) calls of the given tools, and `calls_rest`,
    the calls after the marker that opens them (_opener()). loose: a tool that is not `strict` takes any arguments
    in its call (tool_choice auto); else each call's arguments follow its tool's schema."""
    rules: list[str] = []
    write = _dsml_call if tool_format == "deepseekv32" else _glm_call
    alternatives = [_loose_call(i, t["function"], tool_format, markup, rules) if loose and not is_strict(t)
                    else write(i, t["function"], markup, rules) for i, t in enumerate(tools)]
    rules.insert(0, "call: " + "\n    | ".join(alternatives))
    if tool_format == "deepseekv32":
        rest = f"calls_rest: call{'+' if several else ''} {markup.lit(chr(10) + dsv32.CALLS_END)}"
        calls = f"calls: {markup.lit(chr(10) * 2 + dsv32.CALLS_START)} calls_rest"
    else:  # (GLM's calls are not wrapped: the rest is one call's, text may come between calls)
        rest = "calls_rest: call"
        calls = f"calls: ({markup.lit('<tool_call>')} call)" + ("+" if several else "")
    return [calls, rest] + rules


def _opener(tool_format: str) -> str:
    """The markup that opens a reply's tool calls."""
    return dsv32.CALLS_START if tool_format == "deepseekv32" else "<tool_call>"


def _loose_call(i: int, fn: dict[str, Any], tool_format: str, markup: Markup, rules: list[str]) -> str:
    """A call of a tool that is not strict, in the format's argument markup with any names and values (free text
    there could carry a whole strict call past its schema, or markup the parser gives back as content)."""
    key = "/[^\"<>\\n]+/"  # (a parameter name, as tools.check_tools allows one)
    if tool_format == "deepseekv32":
        value = _text_value({}, markup, f"loose{i}", dsv32.PARAM_END, rules)
        opening, kinds = f'<{dsv32.DSML}parameter name="', " | ".join(markup.lit(f'"{k}">') for k in ("true", "false"))
        head = f"{markup.lit(opening)} {key} {markup.lit(chr(34) + ' string=')} ({kinds})"
        rules.append(f"loose{i}_p: {head} {value} {markup.lit(chr(10))}")
        body = f"(loose{i}_p+ | {markup.lit(chr(10))})"
        return f"{markup.lit(_invoke_head(fn))} {body} {markup.lit(dsv32.INVOKE_END)}"
    value = _text_value({}, markup, f"loose{i}", "</arg_value>", rules)
    rules.append(f"loose{i}_p: {markup.lit('<arg_key>')} {key} {markup.lit('</arg_key>')} {markup.lit('<arg_value>')} "
                 f"{value}")
    return f"{markup.lit(fn['name'])} loose{i}_p* {markup.lit('</tool_call>')}"


def auto_calls_grammar(tools: list[dict[str, Any]], tool_format: str, markup: Markup, several: bool) -> list[str]:
    """Lark rules, `auto` first, of a reply under tool_choice auto with strict tools: free text, and calls whose
    markup is the format's and whose strict tools' arguments follow their schemas (the others' are free). The text
    ends where the calls' opening marker begins; after the calls more text may come (and, if `several`, more
    calls)."""
    rules = tool_call_grammar(tools, tool_format, markup, several, loose=True)
    start = _opener(tool_format)
    # text up to and with the opening marker, which it may not spell before (the parser reads text)
    lead = _text_value({}, markup, "lead", start, rules)
    rules.append(f"TAIL: /(?s:.+)/{_not_holding(start)}")
    return [f"auto: ({lead} calls_rest){'*' if several else '?'} TAIL?"] + rules


@dataclass(frozen=True)
class Constraint:
    """What one request asks to be constrained to: at most one of response_format, regex and ebnf; forced tools
    (which win over them: that reply must be calls); strict tools under auto (beside them: the answer or calls)."""
    response_format: dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    forced_tools: list[dict[str, Any]] | None = None  # tool_choice required / named: these tools
    several_calls: bool = True
    strict_tools: list[dict[str, Any]] | None = None  # tool_choice auto with a strict tool among them: all the tools

    @property
    def empty(self) -> bool:
        schema = schema_of(self.response_format) if self.response_format else None
        return (schema is None and self.regex is None and self.ebnf is None and not self.forced_tools
                and not self.strict_tools)


def build_grammar(c: Constraint, tool_format: str | None, markup: Markup, opens_reasoning: bool) -> str:
    """The llguidance grammar for `c` (not empty)."""
    from llguidance import LLMatcher
    schema = schema_of(c.response_format) if c.response_format else None
    if sum(x is not None for x in (schema, c.regex, c.ebnf)) > 1:
        raise GrammarError("give at most one of response_format, regex and ebnf")
    if (c.forced_tools or c.strict_tools) and tool_format is None:
        raise GrammarError("tool calls held to their schemas need a tool-call parser")
    rules: list[str] = []
    if c.forced_tools:
        rules, body = tool_call_grammar(c.forced_tools, tool_format, markup, c.several_calls), "calls"
    else:
        # the client's EBNF is a nested grammar, so its rule names cannot clash with ours
        body = "answer" if schema is not None else "@answer" if c.ebnf is not None else \
            None if c.regex is None else "/" + _slashes_escaped(c.regex) + "/"
        if schema is not None:
            rules.append(f"answer: {json_rule(schema)}")
        if c.ebnf is not None and not (opens_reasoning or c.strict_tools):
            return ebnf_grammar(c.ebnf)  # the answer, as the client wrote it
        if c.strict_tools and body is None:  # free text and held calls
            rules += auto_calls_grammar(c.strict_tools, tool_format, markup, c.several_calls)
            body = "auto"
        elif c.strict_tools:  # the answer as asked, or calls (without text before them)
            rules += tool_call_grammar(c.strict_tools, tool_format, markup, c.several_calls, loose=True)
            body = f"({body} | calls)"
    if opens_reasoning:  # let the reasoning run up to its first </think> (without calls: the parser reads them)
        held = _opener(tool_format) if tool_format and (c.forced_tools or c.strict_tools) else None
        body = f"{_text_value({}, markup, 'reasoning', THINK_END, rules, held)} {body}"
    lark = "\n".join([f"start: {body}", *rules])
    if c.ebnf is None or c.forced_tools:
        return LLMatcher.grammar_from_lark(lark)
    return json.dumps({"grammars": [{"lark_grammar": lark}, {"name": "answer", "lark_grammar": ebnf_grammar(c.ebnf)}]})


def _slashes_escaped(regex: str) -> str:
    """The regex inside Lark's /.../: each unescaped slash escaped (a client's own \\/ stays as it is)."""
    out, escaped = [], False
    for ch in regex:
        out.append("\\/" if ch == "/" and not escaped else ch)
        escaped = ch == "\\" and not escaped
    return "".join(out)
