"""Anthropic's Messages API request (/v1/messages) and its translation into a chat completions request, so one
renderer, tool and reasoning parser and grammar serve it too: content blocks become chat messages (tool_use
blocks an assistant turn's calls, tool_result blocks tool messages, thinking blocks its reasoning), tools and
tool_choice OpenAI's, `thinking` the templates' thinking switch."""
from __future__ import annotations

import json
from typing import Any

from pydantic import PrivateAttr, StrictBool, StrictFloat, StrictInt

from dsaserve.server import protocol as p
from dsaserve.server.errors import ApiError, bad_request, chat_request, renamed

# The chat request's fields an error may name, as this API calls them
CHAT_NAMES = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences", "response_format": "output_config",
              "reasoning_effort": "thinking", "thinking_budget": "thinking"}
RENAMED_WORDS = {r"tools\[(\d+)\]\.function\.parameters": r"tools[\1].input_schema",
                 r"tools\[(\d+)\]\.function\.": r"tools[\1].", r"\bmax_completion_tokens\b": "max_tokens",
                 r"\bresponse_format\b": "output_config.format", r"\breasoning_effort\b": "thinking",
                 r"\bthinking_budget\b": "thinking.budget_tokens"}
THINKING = ("enabled", "adaptive", "between_tools", "disabled")
CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # tool_choice type -> OpenAI's (else a named tool)


class MessagesRequest(p.Bootstrap):
    model: str | None = None
    max_tokens: StrictInt
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: StrictBool = False
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # {"type": "enabled", "budget_tokens": N} | {"type": "disabled"}
    output_config: dict[str, Any] | None = None  # {"format": {"type": "json_schema", "schema": {...}}, "effort": ...}
    output_format: dict[str, Any] | None = None  # (the structured-outputs beta's name for output_config.format)
    metadata: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension: wins over `thinking`
    mcp_servers: list[Any] | None = None  # (refused: no MCP connector here)
    container: Any = None  # (refused: no code-execution container)
    routed_dp_rank: StrictInt | None = None
    _sources: list[str] = PrivateAttr(default_factory=list)  # where each chat message came from (for errors)

    def as_chat(self, rid: str) -> p.ChatCompletionRequest:
        """The chat completions request that computes this message, or a 400 naming the field it cannot carry."""
        for name in ("mcp_servers", "container"):
            if getattr(self, name) is not None:
                raise bad_request(f"{name} is not supported: this server runs client tools only", param=name)
        messages, self._sources = self.chat_messages()
        choice = self.chat_tool_choice()
        # Anthropic's prefill: a last assistant turn of text is continued by the reply
        prefill = messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
        chat: dict[str, Any] = {
            "add_generation_prompt": not prefill, "continue_final_message": prefill,
            "model": self.model, "rid": rid, "messages": messages, "tools": self.chat_tools(),
            "tool_choice": choice[0], "parallel_tool_calls": choice[1], "max_completion_tokens": self.max_tokens,
            "stop": self.stop_sequences, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "stream": self.stream, "response_format": self.response_format(), "reasoning_effort": self.effort(),
            "thinking_budget": self.thinking_budget(),
            "chat_template_kwargs": self.chat_template_kwargs, "routed_dp_rank": self.routed_dp_rank,
            "user": (self.metadata or {}).get("user_id"),
            **self.model_dump(include={"bootstrap_host", "bootstrap_port", "bootstrap_room"})}
        return chat_request(chat)

    def effort(self) -> str | None:
        """The templates' thinking switch: on for any thinking but disabled."""
        kind = (self.thinking or {}).get("type")
        if self.thinking is not None and kind not in THINKING:
            raise bad_request(f"thinking.type must be one of {', '.join(THINKING)}, got {kind!r}", param="thinking")
        return None if kind is None else "none" if kind == "disabled" else "high"

    def thinking_budget(self) -> Any:
        """Enabled thinking's budget_tokens: the most tokens the reasoning takes (Anthropic's floor of 1024 and its
        bound below max_tokens are not enforced: a budget past max_tokens never comes into play)."""
        return (self.thinking or {}).get("budget_tokens") if (self.thinking or {}).get("type") == "enabled" else None

    def chat_messages(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The conversation as chat messages and where each came from (system, messages[j])."""
        out: list[dict[str, Any]] = []
        if self.system:
            out.append({"role": "system", "content": _text(self.system, "system")})
        sources = ["system"] * len(out)
        for j, message in enumerate(self.messages):
            where = f"messages[{j}]"
            role, content = message.get("role"), message.get("content")
            if role not in ("user", "assistant"):
                raise bad_request(f"{where}.role must be user or assistant, got {role!r}", param="messages")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list):
                raise bad_request(f"{where}.content must be a string or a list of content blocks", param="messages")
            out += (_assistant if role == "assistant" else _user)(blocks, f"{where}.content")
            sources += [where] * (len(out) - len(sources))
        if len(out) == sources.count("system"):
            raise bad_request("messages holds no message", param="messages")
        return out, sources

    def chat_tools(self) -> list[dict[str, Any]] | None:
        tools = []
        for j, tool in enumerate(self.tools or []):
            if tool.get("type", "custom") != "custom":
                raise bad_request(f"tools[{j}]: tools of type {tool.get('type')!r} are not supported: this server "
                                  "runs client tools (name, description, input_schema)", param="tools")
            if not isinstance(tool.get("input_schema"), dict):
                raise bad_request(f"tools[{j}].input_schema must be a JSON schema (an object)", param="tools")
            # (OpenAI's key order: the templates write the function as JSON, so the prompt is chat's for that tool)
            fn = {"name": tool.get("name"), "description": tool.get("description"), "parameters": tool["input_schema"],
                  "strict": tool.get("strict")}
            fn = {k: v for k, v in fn.items() if v is not None}
            tools.append({"type": "function", "function": fn})
        return tools if self.tools is not None else None

    def chat_tool_choice(self) -> tuple[str | dict[str, Any] | None, bool | None]:
        """OpenAI's tool_choice and parallel_tool_calls."""
        if self.tool_choice is None:
            return None, None
        kind = self.tool_choice.get("type")
        serial = self.tool_choice.get("disable_parallel_tool_use")
        if serial is not None and not isinstance(serial, bool):
            raise bad_request(f"tool_choice.disable_parallel_tool_use must be a boolean, got {serial!r}",
                              param="tool_choice")
        serial = False if serial else None
        if kind in CHOICES:
            return CHOICES[kind], serial
        if kind == "tool" and isinstance(self.tool_choice.get("name"), str):
            return {"type": "function", "function": {"name": self.tool_choice["name"]}}, serial
        raise bad_request("tool_choice must be {'type': 'auto' | 'any' | 'none'} or {'type': 'tool', 'name': ...}",
                          param="tool_choice")

    def response_format(self) -> dict[str, Any] | None:
        """output_config.format (or the beta's output_format) as OpenAI's json_schema response_format."""
        fmt = (self.output_config or {}).get("format") or self.output_format
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise bad_request("output_config.format must be {'type': 'json_schema', 'schema': {...}}",
                              param="output_config")
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}

    def renamed(self, exc: ApiError) -> ApiError:
        """A chat completions error in this API's names: messages[j] / system for the message it made, max_tokens,
        output_config.format, thinking, tools[i].name and input_schema."""
        return renamed(exc, self._sources, RENAMED_WORDS, CHAT_NAMES)


def _user(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """A user turn: its tool_result blocks as tool messages, then its text as a user message."""
    out, text = [], []
    for k, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad_request(f"{where}[{k}].tool_use_id must be a string", param="messages")
            result = _text(block.get("content") or "", f"{where}[{k}].content")
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                        "content": f"Error: {result}" if block.get("is_error") is True else result})
        elif kind == "text":
            text.append(_text([block], f"{where}[{k}]"))
        else:
            raise bad_request(f"{where}[{k}]: a user turn's blocks must be text or tool_result, got {kind!r} (this "
                              "server is text-only)", param="messages")
    return out + ([{"role": "user", "content": "\n".join(text)}] if text or not out else [])


def _assistant(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """An assistant turn: its text, thinking blocks as its reasoning, tool_use blocks as its calls."""
    text, reasoning, calls = [], [], []
    for k, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text.append(_text([block], f"{where}[{k}]"))
        elif kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise bad_request(f"{where}[{k}].thinking must be a string", param="messages")
            reasoning.append(block["thinking"])
        elif kind == "redacted_thinking":
            continue  # (never made here: nothing to read back)
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                    or not isinstance(block.get("input", {}), dict):
                raise bad_request(f"{where}[{k}]: a tool_use block needs a string id and name and an object input",
                                  param="messages")
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
        else:
            raise bad_request(f"{where}[{k}]: an assistant turn's blocks must be text, thinking or tool_use, got "
                              f"{kind!r}", param="messages")
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(text) if text or not calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return [message]


def _text(content: Any, where: str) -> str:
    """A string, or text blocks joined by newlines, as vLLM joins them (cache_control and citations are accepted
    and have no effect)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                         and isinstance(b.get("text"), str) for b in content):
        return "\n".join(b["text"] for b in content)
    raise bad_request(f"{where} must be a string or text blocks (this server is text-only)",
                      param=where.split("[")[0].split(".")[0])


class CountTokensRequest(MessagesRequest):
    """/v1/messages/count_tokens: a message request without max_tokens."""
    max_tokens: StrictInt = 1
