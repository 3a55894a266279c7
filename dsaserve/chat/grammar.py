"""Constrained decoding with llguidance: grammar specs (built and checked in the HTTP process) and the
per-request grammar state (built on the DP leader, held on the Request).

Why llguidance: MIT, a 3 MB abi3 wheel with no dependencies (xgrammar pulls triton into a CPU install),
the same code on CPU and GPU hosts (masks are computed on the CPU and applied as a tensor op), JSON
schema, regex, Lark and GBNF grammars, `rollback(n)` and draft-token masks for speculative decoding.

Lifecycle of one request's state (`GrammarState`):
  allowed()   bool [V] mask for the next position (EOS only once the grammar is complete)
  accept(t)   advance by a committed token
  rollback(n) undo the last n accepted tokens (rejected speculative drafts)
  is_terminated  the grammar is complete: only EOS may follow
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from dsaserve.engine.request import Request

log = logging.getLogger(__name__)
# Fixed separators: a JSON answer has one spelling, so a model cannot pad it with whitespace forever.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


_GBNF_RULE = re.compile(r"(?m)^\s*[\w-]+\s*::=")  # a line that defines a GBNF rule
_LARK_RULE = re.compile(r"(?m)^\s*[?!]?\w+(\.-?\d+)?\s*:")  # a line that defines a Lark rule or terminal
# llguidance compiles grammars recursively on the thread's stack: a chain of ~2,500 rules, or of ~700 schemas
# through $ref, overflows 8 MB and kills the process (SIGSEGV, no exception). These limits stay well below.
MAX_GRAMMAR_RULES = 1000
MAX_SCHEMA_DEPTH = 1024  # nested objects and lists of a JSON schema, counted along its $ref chains
_SCHEMA_DATA = ("enum", "const", "default", "examples")  # values, not schemas
MAX_OPEN_PROPERTIES = 450  # optional properties of one JSON object (check_open_properties)


class GrammarError(ValueError):
    """The schema / regex / grammar is invalid (the message names the problem)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain a request to: an llguidance grammar over the vocabulary of `tokenizer_path`,
    ending in one of `eos_ids`. Plain data: it travels inside SamplingParams to the DP leaders."""
    grammar: str
    tokenizer_path: str
    eos_ids: tuple[int, ...]


@functools.lru_cache(maxsize=4)
def ll_tokenizer(path: str, eos_ids: tuple[int, ...]) -> Any:
    """The llguidance view of a tokenizer (1-3 s for a 150K vocabulary): built once per process.

    Given as the tokens' bytes, not as the tokenizer's JSON: llguidance's own conversion (1.9) marks every added
    token special, also those the tokenizer treats as text (`"special": false`: GLM-5's `<tool_call>`,
    `<arg_key>`, `</think>`). A grammar spelling that text then offered the token the tokenizer makes of it
    (its forced bytes are tokenized by the tokenizer) and refused it (its bytes in the trie carry the special
    marker). Here an added token is special only where the tokenizer says so; the others are their text. A
    special token's text in a grammar is spelled in pieces (it was refused the same way)."""
    from llguidance import LLTokenizer, TokenizerWrapper
    from transformers import AutoTokenizer
    return LLTokenizer(TokenizerWrapper(_Vocabulary(AutoTokenizer.from_pretrained(path), eos_ids[0])),
                       eos_token=list(eos_ids))


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads from a byte-level BPE tokenizer (DeepSeek's and GLM's): each
    token's bytes, the special ids, and the tokenizer's own encoding of a text (it keeps added tokens whole)."""

    def __init__(self, hf: Any, eos_id: int):
        char_bytes = _byte_level_chars()
        added = hf.added_tokens_decoder
        self.tokens: list[bytes] = []
        for i, piece in enumerate(hf.convert_ids_to_tokens(list(range(len(hf))))):
            if i in added:
                self.tokens.append(added[i].content.encode())
            elif piece is None or any(c not in char_bytes for c in piece):
                raise GrammarError(f"token {i} ({piece!r}) of this tokenizer is not byte-level BPE, which "
                                   "structured output needs here")
            else:
                self.tokens.append(bytes(char_bytes[c] for c in piece))
        self.special_token_ids = [i for i, t in added.items() if t.special]
        self.eos_token_id, self.bos_token_id = eos_id, hf.bos_token_id
        from tokenizers import Tokenizer
        self._encoder = Tokenizer.from_str(hf.backend_tokenizer.to_str())  # its own copy: called from any thread
        self._encoder.no_padding()
        self._encoder.no_truncation()
        self._encoder.encode_special_tokens = True  # a special token's text in a grammar is text: its pieces

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encoder.encode(text, add_special_tokens=False).ids


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet: the printable Latin-1 bytes stand for themselves, the other bytes for the
    characters from U+0100 on, in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(0x100 + n): b for n, b in enumerate(moved)}}


def one_line(problem: str) -> str:
    """llguidance's message (one line per rule it names) as one line of an error."""
    return " ".join(line.strip() for line in problem.strip().splitlines())[:1000]


def checked_spec(grammar: str, tokenizer_path: str, eos_ids: tuple[int, ...]) -> GrammarSpec:
    from llguidance import LLMatcher
    problem = LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer_path, eos_ids))
    if problem:
        raise GrammarError(one_line(problem))
    return GrammarSpec(grammar, tokenizer_path, eos_ids)


def json_grammar(schema: dict[str, Any]) -> str:
    from llguidance import LLMatcher
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    check_schema_depth(schema)
    try:
        return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_STYLE)
    except ValueError as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from None


def check_json_schema(schema: dict[str, Any]) -> None:
    """GrammarError naming what makes `schema` no valid JSON schema (a bad type, $ref, pattern or bound), found as
    llguidance reads it, without a vocabulary (a fraction of a millisecond for a tool's parameters). Keywords it cannot
    enforce are ignored (`lenient`): they are valid, and only a forced call's grammar has to enforce them."""
    from llguidance import LLMatcher
    problem = LLMatcher.validate_grammar(json_grammar({**schema, "x-guidance": {"lenient": True}}), None)
    if problem:
        raise GrammarError(one_line(problem))


@functools.lru_cache(maxsize=256)
def json_schema_problem(schema: str) -> str:
    """What llguidance's JSON grammar, every keyword enforced, finds wrong with a schema given as JSON text (an
    unsatisfiable one: "Unsatisfiable schema: ..."), on one line; '' if nothing. Cached: clients send the same tools
    with each request."""
    from llguidance import LLMatcher
    try:
        problem = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema), None)
    except ValueError as exc:
        problem = str(exc)
    return one_line(problem)


def check_open_properties(schema: dict[str, Any]) -> None:
    """GrammarError for a JSON object schema that leaves more than MAX_OPEN_PROPERTIES properties optional: after
    its `{` llguidance's parser holds about 4 items per optional property in one row, and past its 2000 (499 of
    them) the request would fail at its first token, after the server took it."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        props = node.get("properties") if isinstance(node, dict) else None
        if isinstance(props, dict):
            required = node.get("required") if isinstance(node.get("required"), list) else []
            optional = len([k for k in props if k not in required])
            if optional > MAX_OPEN_PROPERTIES:
                raise GrammarError(f"a JSON schema object leaves {optional} properties optional: structured output "
                                   f"follows at most {MAX_OPEN_PROPERTIES} (make some required)")
        stack += _subschemas(node)


def _subschemas(node: dict | list) -> list[Any]:
    """The dicts and lists below a schema node (its data keywords' values left out; a $ref not followed)."""
    kids = node if isinstance(node, list) else [v for k, v in node.items() if k not in _SCHEMA_DATA]
    return [k for k in kids if isinstance(k, (dict, list))]


def check_schema_depth(schema: dict[str, Any]) -> None:
    """GrammarError for a schema nested deeper than MAX_SCHEMA_DEPTH levels (a local $ref continues the path into
    its target; a cycle ends it, as a recursive schema is compiled once)."""
    heights: dict[int, int] = {}  # node id -> levels below it, for nodes already measured

    def resolve(ref: str) -> Any:
        node: Any = schema
        for part in ref[1:].split("/")[1:] if ref.startswith("#") else [None]:
            part = None if part is None else part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part is not None and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None  # (not local, or not there: llguidance names the problem)
        return node

    def children(node: Any) -> list[Any]:
        if isinstance(node, dict) and isinstance(node.get("$ref"), str):
            target = resolve(node["$ref"])
            return _subschemas(node) + ([target] if isinstance(target, (dict, list)) else [])
        return _subschemas(node)

    # an iterative walk (a recursive one would meet Python's own recursion limit first)
    stack: list[tuple[Any, list[Any], int]] = [(schema, children(schema), 0)]  # node, children left, levels below
    active = {id(schema)}  # the nodes on the path (a $ref back to one of them is a cycle)
    while stack:
        node, todo, below = stack[-1]
        if not todo:
            stack.pop()
            active.discard(id(node))
            heights[id(node)] = below + 1
            if stack:
                stack[-1] = (*stack[-1][:2], max(stack[-1][2], below + 1))
            continue
        child = todo.pop()
        if id(child) in active:
            continue
        if len(stack) + heights.get(id(child), 1) > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the JSON schema nests more than {MAX_SCHEMA_DEPTH} levels deep (counting through "
                               "$ref), more than this server compiles")
        if id(child) in heights:
            stack[-1] = (node, todo, max(below, heights[id(child)]))
        else:
            active.add(id(child))
            stack.append((child, children(child), 0))


def ebnf_grammar(ebnf: str) -> str:
    """SGLang's `ebnf` (GBNF: `root ::= ...`); a grammar in Lark syntax (`start: ...`) is taken as it is."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark
    rules = len((_GBNF_RULE if _GBNF_RULE.search(ebnf) else _LARK_RULE).findall(ebnf))
    if rules > MAX_GRAMMAR_RULES:  # (before converting: GBNF's converter takes seconds on thousands of rules)
        raise GrammarError(f"the grammar defines {rules} rules, more than the {MAX_GRAMMAR_RULES} this server compiles")
    try:
        lark = gbnf_to_lark(ebnf) if _GBNF_RULE.search(ebnf) else ebnf  # ("::=" inside a Lark string is text)
    except Exception as exc:  # the converter raises plain exceptions on syntax errors
        raise GrammarError(f"invalid EBNF grammar: {exc}") from None
    return LLMatcher.grammar_from_lark(lark)


@functools.lru_cache(maxsize=8)
def compiled(spec: GrammarSpec) -> Any:
    """The grammar's matcher at its start, compiled once per process (a large schema takes about a second: n choices
    or repeated requests compiling it each time kept their requests waiting for n seconds). Never advanced: each
    request takes a deep copy."""
    from llguidance import LLMatcher
    return LLMatcher(ll_tokenizer(spec.tokenizer_path, spec.eos_ids), spec.grammar)


class GrammarState:
    """One request's position in its grammar (leader process only)."""

    def __init__(self, spec: GrammarSpec, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_ids = spec.eos_ids
        self.known = ll_tokenizer(spec.tokenizer_path, spec.eos_ids).vocab_size  # (a vocabulary may be padded past)
        self.matcher = compiled(spec).deep_copy()  # (a copy costs microseconds, a compile up to seconds)
        if self.matcher.is_error():
            log.error("grammar rejected in the engine: %s", self.matcher.get_error())

    def allowed(self) -> torch.Tensor:
        """bool [vocab_size]: the tokens the grammar allows next; EOS alone if it allows nothing."""
        return self._mask(self.matcher)

    def _mask(self, matcher: Any) -> torch.Tensor:
        import numpy as np
        import torch  # here: the HTTP process builds specs without torch (it starts faster)
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(len(bits), self.vocab_size)
        mask[:n] = torch.from_numpy(bits[:n].astype(bool))
        if not bool(mask.any()):  # an error state: let the request end
            mask[list(self.eos_ids)] = True
        return mask

    def allowed_after(self, pending: list[int]) -> torch.Tensor:
        """The mask after the tokens `pending` (speculative drafts), leaving the state as it was. Drafts
        past the first one the grammar rejects are ignored: the verify row before it rejects it anyway. So are drafts
        from an id the tokenizer lacks (unconstrained drafts reach the padded ids; llguidance would take one as
        the request's error, not as a rejected draft). The drafts go into a copy of the matcher: llguidance
        refuses to roll back a grammar with `max_tokens` or `stop` lexemes (which a client's Lark may hold), and
        its validate_tokens passes drafts that consuming then refuses there (the copy's mask is EOS alone then:
        that row's request meets the same refusal when it commits, and ends alone)."""
        pending = pending[:next((i for i, t in enumerate(pending) if not 0 <= t < self.known), len(pending))]
        n = self.matcher.validate_tokens(pending) if pending else 0
        if not n:
            return self.allowed()
        ahead = self.matcher.deep_copy()
        ahead.consume_tokens(pending[:n])
        return self._mask(ahead)

    def accept(self, token: int) -> bool:
        return self.matcher.consume_token(token)

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_stopped()

    def failure(self) -> str | None:
        """Why the matcher stopped following the grammar (a limit it hit), or None. Its lexer's limits are shared
        by every copy of the compiled grammar, which this request may have spent: the compiled grammars are
        dropped, so the requests after it compile theirs afresh."""
        if not self.matcher.is_error():
            return None
        compiled.cache_clear()
        error = self.matcher.get_error().strip().splitlines()[0]
        if "NoExtensionBias" in error:  # (llguidance's name for an empty mask where the output is not complete)
            return f"no text can continue the output here, so the constraint can never be met ({error})"
        return error


def grammar_state(req: Request, vocab_size: int) -> GrammarState:
    """The request's grammar state: from the leader's background compile (the engine samples a request only once
    that ended), else made now."""
    if req.grammar is None:
        compiling = req.grammar_compile
        req.grammar = compiling.result() if compiling is not None else GrammarState(req.params.grammar, vocab_size)
    return req.grammar


def commit_tokens(req: Request, tokens: list[int]) -> None:
    """Advance the request's grammar by tokens the engine committed (call once per committed token)."""
    if req.grammar is not None:
        for t in tokens:
            req.grammar.accept(t)


def schema_of(response_format: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema an OpenAI response_format asks for (None for plain text)."""
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec.get("schema_")) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise GrammarError("response_format json_schema needs json_schema.schema (an object)")
        return schema
    raise GrammarError(f"response_format type must be text, json_object or json_schema, got {kind!r}")

