"""A forced GLM tool call holds a raw string argument to its `format` (GLM writes strings as raw text, where
llguidance's JSON formats do not reach): the same values pass as llguidance's JSON grammar lets through a JSON
string of that format (the DSML path), value by value; IPv6 is held to Python's ipaddress (RFC 4291), which also
takes an IPv4 tail that llguidance refuses."""
from __future__ import annotations

import ipaddress
import json

import pytest

from dsaserve.chat.constrain import MARKUP_TEXTS, Constraint, build_grammar, markup_for
from dsaserve.chat.grammar import GrammarError, GrammarSpec, GrammarState, ll_tokenizer
from dsaserve.engine.tokenizer import Tokenizer
from dsaserve.tiny import make_tiny_model, save_tokenizer

VALUES = {
    "date": ["2026-12-06", "2026-13-06", "2026-12-32", "26-12-06", "2026-1-6", "2026-02-29", "2026-02-30",
             "2026-04-31", "2026-06-30", "2026-12-06T"],
    "time": ["12:30:00Z", "12:30:00.123+01:00", "23:59:60z", "24:00:00Z", "12:30:00", "12:30Z", "12:30:00+1:00"],
    "date-time": ["2026-12-06T12:30:00Z", "2026-12-06t12:30:00.5-08:00", "2026-12-06 12:30:00Z",
                  "2026-12-06T12:30:00", "2026-12-06"],
    "duration": ["P1D", "PT1H30M", "P1Y2M3DT4H5M6S", "P2W", "P1M", "P", "PT", "P1H", "1D", "P1DT", "P1.5D"],
    "email": ["a@b.co", "first.last+tag@example.org", "a@b", "a@[1.2.3.4]", "@b.co", "a@@b.co", "a b@c.de",
              "a.@b.co", '"q"@b.co', "a@[300.1.1.1]"],
    "hostname": ["example.com", "a-b.c", "localhost", "x" * 63 + ".com", "-a.com", "a_b.com", "a..b",
                 "x" * 64 + ".com", "example.com."],
    "ipv4": ["192.168.0.1", "0.0.0.0", "255.255.255.255", "256.1.1.1", "1.2.3", "01.2.3.4", "1.2.3.4.5"],
    "ipv6": ["::1", "::", "fe80::1:2", "1:2:3:4:5:6:7:8", "FE80::A", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8",
             "::ffff:1.2.3.4", "1:2:3:4:5:6:1.2.3.4", "1::2::3", "12345::", "1:2:3:4:5:6:7:8:9", "g::1",
             "1:2:3:4:5:6:7", "::1.2.3", "1:2:3:4:5:6:7:1.2.3.4"],
    "uuid": ["123e4567-e89b-12d3-a456-426614174000", "123E4567-E89B-12D3-A456-426614174000",
             "123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456-42661417400"],
    "uri": ["https://example.com/a?b=c#d", "urn:isbn:0451450523", "mailto:a@b.co", "http://a/%41", "http://[::1]/",
            "a:", "no-scheme", "http://a b", "1http://x", "http://a/%zz"],
}


@pytest.fixture(scope="module")
def glm(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object, object]:
    path = str(save_tokenizer(make_tiny_model(tmp_path_factory.mktemp("formats") / "glm5", "glm_moe_dsa"), "glm5"))
    hf = Tokenizer(path).hf
    return path, hf, markup_for(hf, ll_tokenizer(path, (1,)), MARKUP_TEXTS)


def accepts(glm: tuple, constraint: Constraint, tool_format: str | None, text: str) -> bool:
    path, hf, markup = glm
    st = GrammarState(GrammarSpec(build_grammar(constraint, tool_format, markup, False), path, (1,)), len(hf))
    for t in hf.encode(text, add_special_tokens=False):
        if not bool(st.allowed()[t]) or not st.accept(t):
            return False
    return st.is_terminated


def forced(schema: dict) -> Constraint:
    return Constraint(forced_tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": schema}, "required": ["a"]}}}], several_calls=False)


def ipv6(value: str) -> bool:
    try:
        ipaddress.IPv6Address(value)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("fmt", list(VALUES))
def test_a_glm_raw_string_argument_keeps_its_format(glm: tuple, fmt: str) -> None:
    json_format = Constraint(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "string", "format": fmt}}})
    raw, expected = forced({"type": "string", "format": fmt}), {}
    for value in VALUES[fmt]:
        expected[value] = ipv6(value) if fmt == "ipv6" else accepts(glm, json_format, None, json.dumps(value))
    got = {value: accepts(glm, raw, "glm47", f"<tool_call>f<arg_key>a</arg_key><arg_value>{value}</arg_value>"
                          "</tool_call>") for value in VALUES[fmt]}
    assert got == expected
    assert any(expected.values()) and not all(expected.values())  # (the values tell formats apart)


def test_format_beside_a_pattern_and_lengths_and_an_unknown_format(glm: tuple) -> None:
    """A format joins the argument's pattern and length bounds (all must hold); a format the grammar cannot check
    is refused by name when the grammar is built (a 400), as llguidance refuses it inside JSON."""
    both = forced({"type": "string", "format": "date", "pattern": "^2026-", "maxLength": 10})
    call = "<tool_call>f<arg_key>a</arg_key><arg_value>{}</arg_value></tool_call>"
    assert [accepts(glm, both, "glm47", call.format(v)) for v in ("2026-12-06", "2025-12-06", "2026-12-6")] == \
        [True, False, False]
    _, _, markup = glm
    with pytest.raises(GrammarError, match="unknown string format 'colour'"):
        build_grammar(forced({"type": "string", "format": "colour"}), "glm47", markup, False)
