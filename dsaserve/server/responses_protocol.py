"""OpenAI's Responses API request (/v1/responses) and its translation into a chat completions request: the input
items become chat messages, so one renderer, one tool and reasoning parser and one grammar serve both APIs.
A response is stored (responses_store.py) unless `store` is false: previous_response_id continues its conversation;
stored conversations, prompts and item references are refused."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, field_validator

from dsaserve.server import protocol as p
from dsaserve.server.errors import ApiError, bad_request, chat_request, renamed

INPUT_ROLES = ("user", "assistant", "system", "developer")
# The chat request's fields that an error may name, as this API calls them
CHAT_NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text",
              "reasoning_effort": "reasoning"}
RENAMED_WORDS = {r"tools\[(\d+)\]\.function\.": r"tools[\1].", r"\bmax_completion_tokens\b": "max_output_tokens",
                 r"\bresponse_format\b": "text.format", r"\breasoning_effort\b": "reasoning.effort"}
TEXT_PARTS = ("input_text", "output_text", "text")  # output_text: an earlier assistant turn sent back


class ResponsesRequest(p.Bootstrap):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None  # vLLM's and SGLang's sampling extensions, as in chat completions
    min_p: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    reasoning: dict[str, Any] | None = None  # {"effort": ...}: chat completions' reasoning_effort
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension: wins over `reasoning` (thinking_kwargs)
    # the most tokens the reasoning takes before </think> is forced, as on chat completions (vLLM's name too)
    thinking_budget: StrictInt | None = Field(None, ge=0, validation_alias=AliasChoices("thinking_budget",
                                                                                        "thinking_token_budget"))
    previous_response_id: str | None = None  # a stored response whose conversation this one continues
    store: StrictBool | None = None  # (OpenAI's default: stored)
    # What needs a stored conversation or prompt, or work in the background (refused)
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None  # a stored prompt template
    background: StrictBool | None = None
    context_management: Any = None
    truncation: Literal["auto", "disabled"] | None = None
    max_tool_calls: StrictInt | None = None  # (built-in tools' calls: none here)
    include: list[str] | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    metadata: dict[str, str] | None = None
    user: str | None = None
    routed_dp_rank: StrictInt | None = None
    _sources: list[str] = PrivateAttr(default_factory=list)  # where each chat message came from (for errors)
    _earlier: list[dict[str, Any]] = PrivateAttr(default_factory=list)  # previous_response_id's conversation

    @field_validator("input", mode="before")
    @classmethod
    def _items_are_objects(cls, value: Any) -> Any:
        """One readable error for an item that is no object (pydantic's names each member of the union)."""
        for j, item in enumerate(value if isinstance(value, list) else []):
            if not isinstance(item, dict):
                raise ValueError(f"input[{j}] must be an object (a message or another item), got {item!r}")
        return value

    def as_chat(self, rid: str) -> p.ChatCompletionRequest:
        """The chat completions request that computes this response, or a 400 naming the field it cannot carry."""
        self._refuse_unsupported()
        messages, self._sources = self.messages()
        chat: dict[str, Any] = {
            "model": self.model, "rid": rid, "messages": messages, "tools": self.chat_tools(),
            "tool_choice": self.chat_tool_choice(), "parallel_tool_calls": self.parallel_tool_calls,
            "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
            "seed": self.seed, "stream": self.stream, "response_format": self.response_format(),
            "chat_template_kwargs": self.chat_template_kwargs, "reasoning_effort": (self.reasoning or {}).get("effort"),
            "thinking_budget": self.thinking_budget, "routed_dp_rank": self.routed_dp_rank,
            **self.model_dump(include={"bootstrap_host", "bootstrap_port", "bootstrap_room"})}
        return chat_request(chat)

    def _refuse_unsupported(self) -> None:
        stored = {"conversation": self.conversation, "prompt": self.prompt, "background": self.background or None,
                  "context_management": self.context_management,
                  "truncation": "auto" if self.truncation == "auto" else None}
        for name, value in stored.items():
            if value is not None:
                raise bad_request(f"{name} is not supported: this server stores responses (previous_response_id) "
                                  "but no conversations or prompts, and truncates nothing", param=name)
        asked = [x for x in self.include or [] if x != "reasoning.encrypted_content"]
        if asked or self.top_logprobs:  # (encrypted reasoning: none is made, and the reasoning text is sent as is)
            raise bad_request(f"include {asked} / top_logprobs: log-probabilities and other extra output are not "
                              "supported on /v1/responses (chat completions returns log-probabilities)",
                              param="include" if asked else "top_logprobs")

    def messages(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The conversation as chat messages, and where each came from (instructions, input[j]): instructions
        first (a system message), a function call joining the assistant message before it (one turn with its
        calls), reasoning items going to the assistant output right after them (a turn's reasoning and answer);
        reasoning before no assistant output (a turn cut inside it) is left out, as the templates leave out the
        reasoning of turns before the last user message."""
        out: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        sources = ["instructions"] * len(out)
        items, earlier = self._earlier + self.input_items(), len(self._earlier)
        reasoning: list[str] = []
        for j, item in enumerate(items):
            where = f"input[{j - earlier}]" if j >= earlier else f"previous_response_id's item {j}"
            kind = item.get("type", "message")
            if kind == "reasoning":
                reasoning.append(_text(item.get("content") or item.get("summary") or [], f"{where}.content"))
                continue
            if kind == "message":
                role = item.get("role")
                if role not in INPUT_ROLES:
                    raise bad_request(f"{where}.role must be one of {', '.join(INPUT_ROLES)}, got {role!r}", "input")
                out.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
            elif kind == "function_call":
                call = {"id": _string(item, "call_id", where), "type": "function",
                        "function": {"name": _string(item, "name", where),
                                     "arguments": _string(item, "arguments", where)}}
                if not out or out[-1]["role"] != "assistant":
                    out.append({"role": "assistant", "content": None})
                out[-1].setdefault("tool_calls", []).append(call)
            elif kind == "function_call_output":
                out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                            "content": _text(item.get("output"), f"{where}.output")})
            else:
                raise bad_request(f"{where}: items of type {kind!r} are not supported (this server stores nothing "
                                  "and runs function tools: message, function_call, function_call_output and "
                                  "reasoning items)", param="input")
            sources += [where] * (len(out) - len(sources))
            if reasoning and out[-1]["role"] == "assistant":
                out[-1]["reasoning_content"] = out[-1].get("reasoning_content", "") + "".join(reasoning)
            reasoning = []
        if not out:
            raise bad_request("input holds no message", param="input")
        return out, sources

    def input_items(self) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input

    def continuing(self, earlier: list[dict[str, Any]]) -> None:
        """previous_response_id's conversation, before this request's input (its instructions are not carried
        over, as OpenAI's are not)."""
        self._earlier = earlier

    def conversation_after(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation up to and with this response's output items, as input items (what is stored)."""
        return [*self._earlier, *self.input_items(), *output]

    def chat_tools(self) -> list[dict[str, Any]] | None:
        if self.tools is None:
            return None
        tools = []
        for j, tool in enumerate(self.tools):
            if tool.get("type") != "function":
                raise bad_request(f"tools[{j}]: tools of type {tool.get('type')!r} are not supported: this server "
                                  "runs function tools", param="tools")
            tools.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                                "strict") if tool.get(k) is not None}})
        return tools

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return choice
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        raise bad_request(f"tool_choice {choice!r} is not supported: give auto, none, required or "
                          "{\"type\": \"function\", \"name\": ...}", param="tool_choice")

    def response_format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format") or {"type": "text"}
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise bad_request("text.format of type json_schema needs its schema (an object)", param="text")
            return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema",
                                                                               "strict") if k in fmt}}
        raise bad_request(f"text.format must be of type text, json_object or json_schema, got {fmt!r}", param="text")

    def renamed(self, exc: ApiError) -> ApiError:
        """A chat completions error in this API's names: input[j] for the message it made, max_output_tokens,
        text.format, tools[i].name."""
        return renamed(exc, self._sources, RENAMED_WORDS, CHAT_NAMES)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key} must be a string, got {value!r}", param="input")
    return value


def _text(content: Any, where: str) -> str:
    """A string, or the text of a list of text parts (input_text, output_text, reasoning_text, summary_text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of text parts, got {content!r}", param="input")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in (*TEXT_PARTS, "reasoning_text", "summary_text", "refusal"):
            raise bad_request(f"{where}[{k}]: parts of type {kind!r} are not supported: this model reads text",
                              param="input")
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise bad_request(f"{where}[{k}]: the {kind} part needs its {'refusal' if kind == 'refusal' else 'text'} "
                              f"(a string), got {text!r}", param="input")
        texts.append(text)
    return "".join(texts)

