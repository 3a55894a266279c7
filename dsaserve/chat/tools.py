"""OpenAI `tools` and `tool_choice`: checked, and resolved into what the prompt shows and what is parsed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# tool_choice after resolution: "none", "auto", "required", or the name of the one function to call.
ToolChoice = str


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


def name_of(tool: dict[str, Any]) -> str:
    return tool["function"]["name"]


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
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema of type object")
        seen.add(name)
    return list(tools or [])


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
    name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise ValueError("a named tool_choice is {'type': 'function', 'function': {'name': ...}}")
    if name not in {name_of(t) for t in tools}:
        raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
    return name
