"""OpenAI `tools` and `tool_choice`: checked, and resolved into what the prompt shows and what is parsed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsaserve.chat.grammar import GrammarError, check_json_schema

# tool_choice after resolution: "none", "auto", "required", or the name of the one function to call.
ToolChoice = str
# A forced call's grammar (chat.constrain) offers each choice as an alternative at one position: the tools (for
# "required"), a function's optional parameters (two items each), a raw string argument's enum values. llguidance's
# parser holds at most 2000 items per position and fails the request mid-reply past that (3,000 tools did), so
# forced calls are refused up front above half of it.
MAX_FORCED_CHOICES = 1000
_LENGTHS = ("minLength", "maxLength")  # a string property's bounds, which the forced grammar reads (null: absent)


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]]  # the tools the prompt shows (none for tool_choice "none")
    choice: ToolChoice

    @property
    def parse(self) -> bool:
        return bool(self.tools)

    @property
    def forced(self) -> list[dict[str, Any]] | None:
        """The tools one of which must be called (required / named), else None."""
        if self.choice in ("none", "auto"):
            return None
        return self.tools if self.choice == "required" else [t for t in self.tools if name_of(t) == self.choice]

    @property
    def strict(self) -> list[dict[str, Any]] | None:
        """Under auto, the tools when one of them is `strict` (its calls' arguments must follow its schema, as
        OpenAI's and SGLang's strict mode hold them), else None."""
        return self.tools if self.choice == "auto" and any(is_strict(t) for t in self.tools) else None

    @property
    def bound(self) -> list[dict[str, Any]]:
        """The tools whose calls' arguments the reply's grammar holds to their schemas."""
        return self.forced or [t for t in self.strict or () if is_strict(t)]


def name_of(tool: dict[str, Any]) -> str:
    return tool["function"]["name"]


def is_strict(tool: dict[str, Any]) -> bool:
    return tool["function"].get("strict") is True


def check_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Tools in OpenAI's shape, or ValueError naming the first problem."""
    seen: set[str] = set()
    for i, tool in enumerate(tools or []):
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        if name in seen:
            raise ValueError(f"tools[{i}]: the function name {name!r} is given twice")
        _check_markup_text(name, f"tools[{i}].function.name")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise ValueError(f"tools[{i}].function.strict must be a boolean, got {fn['strict']!r}")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema of type object")
        params = parameters_of(fn, f"tools[{i}].function.parameters")
        if params.get("type", "object") != "object":
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema of type object")
        _check_parameters(params, f"tools[{i}].function.parameters")
        seen.add(name)
    return list(tools or [])


def parameters_of(fn: dict[str, Any], where: str = "parameters") -> dict[str, Any]:
    """A function's parameter schema, a `$ref` at its root (zod-to-json-schema writes one) resolved to the local
    JSON pointer it names (`#/$defs/Args`, `~1` / `~0` escapes, deeper paths); the root's definitions stay, for
    `$ref`s further in. ValueError if it names nothing."""
    root = fn.get("parameters") or {}
    defs = {k: root[k] for k in ("$defs", "definitions") if isinstance(root.get(k), dict)}
    params = root
    for _ in range(8):  # a ref may name a definition that is itself a ref
        ref = params.get("$ref")
        if ref is None:
            return params
        target: Any = root if isinstance(ref, str) and ref.startswith("#/") else None
        for part in ref[2:].split("/") if target is not None else ():
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            raise ValueError(f"{where}.$ref {ref!r} must name a schema inside these parameters (#/$defs/NAME)")
        params = {**defs, **target}
    raise ValueError(f"{where}.$ref: a chain of more than 8 references")


def _check_markup_text(text: str, where: str) -> None:
    """Names the tool-call markup writes between quotes or tags (DSML's name="...", GLM's <arg_key>...)."""
    bad = [c for c in '"<>\n' if c in text]
    if bad:
        raise ValueError(f"{where} {text!r} contains {bad[0]!r}, which the model's tool-call markup cannot carry")


def _check_parameters(params: dict[str, Any], where: str) -> None:
    """What the forced-call grammar reads from a parameter schema, checked: properties an object of schemas,
    required a list of names, and a string's minLength <= maxLength as non-negative integers. The rest of each
    property's schema is checked when its grammar is built."""
    props = params.get("properties", {})
    if not isinstance(props, dict):
        raise ValueError(f"{where}.properties must be an object (name -> JSON schema)")
    required = params.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError(f"{where}.required must be a list of property names")
    for key, schema in props.items():
        _check_markup_text(key, f"{where}.properties key")
        if isinstance(schema, bool):  # JSON Schema's true / false
            continue
        if not isinstance(schema, dict):
            raise ValueError(f"{where}.properties.{key} must be a JSON schema (an object or a boolean)")
        lengths = [schema.get(k) for k in _LENGTHS]
        if any(v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0) for v in lengths):
            raise ValueError(f"{where}.properties.{key}: minLength and maxLength must be non-negative integers")
        if None not in lengths and lengths[0] > lengths[1]:
            raise ValueError(f"{where}.properties.{key}: minLength {lengths[0]} is above maxLength {lengths[1]}")


def _null_lengths_dropped(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters with each property's null minLength / maxLength left out: null reads as absent here and in the
    forced call's grammar (clients' schema generators write unset bounds so), and llguidance refuses it."""
    props = {k: {key: v for key, v in schema.items() if not (key in _LENGTHS and v is None)}
             if isinstance(schema, dict) else schema for k, schema in (params.get("properties") or {}).items()}
    return {**params, "properties": props} if props else params


def check_held_calls(plan: ToolPlan) -> None:
    """ValueError when the grammar of the plan's calls (forced, or strict tools' under auto) would offer more than
    MAX_FORCED_CHOICES choices at one position, or cannot be built from the schema of a tool it holds to its
    schema (nothing to check for a tool the grammar does not hold: its schema is only shown to the model, and valid
    JSON schemas llguidance cannot enforce, look-around patterns, stay welcome there)."""
    kind, way_out = ("a forced call", "use tool_choice 'auto'") if plan.forced else ("a strict call", "drop its strict")
    if plan.choice == "required" and len(plan.tools) > MAX_FORCED_CHOICES:
        raise ValueError(f"tools holds {len(plan.tools)} functions and tool_choice 'required' forces a call of one "
                         f"of them: a forced call chooses among at most {MAX_FORCED_CHOICES} (send fewer tools, name "
                         "the one to call, or use tool_choice 'auto')")
    if plan.strict and len(plan.tools) > MAX_FORCED_CHOICES:
        raise ValueError(f"tools holds {len(plan.tools)} functions and a strict one holds every call to the tools: "
                         f"a call chooses among at most {MAX_FORCED_CHOICES} (send fewer tools, or none strict)")
    names = {name_of(t) for t in plan.bound}
    for i, tool in enumerate(plan.tools):
        if name_of(tool) not in names:
            continue
        where = f"tools[{i}].function.parameters"
        params = parameters_of(tool["function"], where)
        props, required = params.get("properties") or {}, set(params.get("required") or [])
        optional = len([k for k in props if k not in required])
        if 2 * optional > MAX_FORCED_CHOICES:
            raise ValueError(f"{where} has {optional} optional properties: {kind} leaves at most "
                             f"{MAX_FORCED_CHOICES // 2} open (make some required, or {way_out})")
        for key, schema in props.items():
            values = schema.get("enum") if isinstance(schema, dict) and schema.get("type") == "string" else None
            if values == []:  # (the grammar's choice among none would take the empty string)
                raise ValueError(f"{where}.properties.{key}.enum is empty: no value satisfies it, so no call of "
                                 f"{name_of(tool)!r} can be {'forced' if plan.forced else 'made'}")
            if isinstance(values, list) and len(values) > MAX_FORCED_CHOICES:
                raise ValueError(f"{where}.properties.{key}.enum has {len(values)} values: {kind} chooses "
                                 f"among at most {MAX_FORCED_CHOICES} (or {way_out})")
        try:  # the grammar is built from it: a schema it cannot read is named here, not by a grammar dump
            check_json_schema(_null_lengths_dropped(params))
        except GrammarError as exc:
            raise ValueError(f"{where} of {name_of(tool)!r} is not a valid JSON schema for {kind}: {exc}") \
                from None


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> ToolPlan:
    tools = check_tools(tools)
    choice = _choice(tool_choice, tools)
    return ToolPlan(tools if choice != "none" else [], choice)


def _choice(tool_choice: str | dict[str, Any] | None, tools: list[dict[str, Any]]) -> ToolChoice:
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be none, auto, required or a named function, got {tool_choice!r}")
        if tool_choice == "required" and not tools:
            raise ValueError("tool_choice 'required' needs tools")
        return tool_choice if tools else "none"
    fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ValueError("a named tool_choice is {'type': 'function', 'function': {'name': ...}}")
    if name not in {name_of(t) for t in tools}:
        raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
    return name


JSON_TYPE = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
             dict: "object"}


def resolve_ref(schema: dict[str, Any], root: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A parameter's schema with a local `$ref` followed, to the definitions of `root` (the tool's parameters) or
    those the schema carries; None if it names nothing."""
    if "$ref" not in schema:
        return schema
    defs = {k: v for k, v in (root or {}).items() if k in ("$defs", "definitions")}
    try:
        return parameters_of({"parameters": {**defs, **schema}})
    except ValueError:
        return None


def allowed_types(schema: Any, root: dict[str, Any] | None, depth: int = 0) -> set[str] | None:
    """The JSON types a parameter's schema allows, through local $refs: its type, its const / enum values' types,
    or the union of its anyOf / oneOf branches; None where it says none of these (any type)."""
    if not isinstance(schema, dict) or depth > 8 or (schema := resolve_ref(schema, root)) is None:
        return None
    types = schema.get("type")
    if isinstance(types, (str, list)):
        found = {types} if isinstance(types, str) else {t for t in types if isinstance(t, str)}
        return found | {"integer"} if "number" in found else found
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(values, list):
        return {JSON_TYPE.get(type(v), "object") for v in values}
    branches = schema.get("anyOf", schema.get("oneOf"))
    if isinstance(branches, list):
        found_each = [allowed_types(b, root, depth + 1) for b in branches]
        return None if None in found_each else set().union(*found_each)
    return None
