"""Chat rendering: OpenAI messages (+ tools, + chat_template_kwargs) -> prompt text and token ids.

Two encodings: the tokenizer's Jinja chat template (GLM-5 and most models), or DeepSeek-V3.2's
published encoding (`deepseek_v32`), chosen automatically for a `deepseek_v32` model whose tokenizer
has no template, or forced with `--tokenizer-mode deepseek_v32`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsaserve.chat import dsv32, json_text

if TYPE_CHECKING:
    from dsaserve.engine.tokenizer import Tokenizer

TOKENIZER_MODES = ("auto", "hf", "deepseek_v32")
THINK_START, THINK_END = dsv32.THINK_START, dsv32.THINK_END
# Variables the renderer sets itself: a chat_template_kwargs key may not replace them.
RESERVED_KWARGS = frozenset({"messages", "tools", "add_generation_prompt", "tokenize", "documents",
                             "continue_final_message", "return_dict", "chat_template"})
# chat_template_kwargs that must be booleans (GLM's clear_thinking: the string "false" would clear the reasoning the
# client asked to keep)
THINKING_SWITCHES = frozenset({"thinking", "enable_thinking", "clear_thinking"})


def thinking_kwargs(kwargs: dict[str, Any] | None, effort: str | None) -> dict[str, Any] | None:
    """chat_template_kwargs with a reasoning effort (OpenAI's reasoning_effort / reasoning.effort) as the templates'
    thinking switch (DeepSeek-V3.2's `thinking`, GLM's `enable_thinking`): "none" off, any other effort on. Kwargs
    that set a switch themselves win whole (either name: the V3.2 encoding reads `enable_thinking` too)."""
    if effort is None or THINKING_SWITCHES & (kwargs or {}).keys():
        return kwargs
    return {"thinking": effort != "none", "enable_thinking": effort != "none", **(kwargs or {})}


class ChatFormatError(ValueError):
    """The conversation cannot be rendered (the message names what is wrong; `param`: the request field)."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RenderedChat:
    text: str
    ids: list[int]

    @property
    def opens_reasoning(self) -> bool:
        """The prompt ends inside a reasoning block: the reply starts with reasoning."""
        return self.text.rstrip().endswith(THINK_START)


class ChatFormat:
    def __init__(self, tokenizer: Tokenizer, mode: str = "auto", model_type: str | None = None):
        if mode not in TOKENIZER_MODES:
            raise ValueError(f"--tokenizer-mode must be one of {', '.join(TOKENIZER_MODES)}, got {mode!r}")
        self.tok = tokenizer
        has_template = bool(getattr(tokenizer.hf, "chat_template", None))
        if mode == "auto":
            mode = "deepseek_v32" if (model_type == "deepseek_v32" and not has_template) else "hf"
        self.encoding = mode  # "hf" (the Jinja template) or "deepseek_v32"
        self.available = mode == "deepseek_v32" or has_template

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> RenderedChat:
        """continue_final_message: the prompt ends inside the last message, which the reply continues."""
        kwargs = dict(kwargs or {})
        bad = sorted(RESERVED_KWARGS & kwargs.keys())
        if bad:
            raise ChatFormatError(f"chat_template_kwargs may not set {', '.join(bad)}", "chat_template_kwargs")
        for key in THINKING_SWITCHES & kwargs.keys():  # ("false" is true to Python and to a Jinja template)
            if not isinstance(kwargs[key], bool):
                raise ChatFormatError(f"chat_template_kwargs {key} must be true or false, got {kwargs[key]!r}",
                                      "chat_template_kwargs")
        try:
            text = self._text(results_in_call_order([normalize(m) for m in messages]), tools or None, kwargs,
                              add_generation_prompt, continue_final_message)
        except ChatFormatError:
            raise
        except Exception as exc:  # a template or encoding that rejects the conversation: the client's problem
            raise ChatFormatError(f"cannot apply the chat template: {exc}") from None
        return RenderedChat(text, list(self.tok.hf.encode(text, add_special_tokens=False)))

    def _text(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, kwargs: dict[str, Any],
              add_generation_prompt: bool, continue_final_message: bool = False) -> str:
        if self.encoding == "deepseek_v32":
            # The published encoding has no generation-prompt switch: a user turn always opens the reply.
            thinking = bool(kwargs.get("thinking", kwargs.get("enable_thinking", False)))
            if continue_final_message and (not messages or messages[-1]["role"] != "assistant"):
                raise ChatFormatError("continue_final_message needs an assistant message last (the DeepSeek-V3.2 "
                                      "encoding continues an assistant turn)")
            text = dsv32.encode_messages(messages, thinking=thinking, tools=tools)
            return text.removesuffix(dsv32.EOS) if continue_final_message else text  # the turn left open
        if not self.available:
            raise ChatFormatError("the model's tokenizer has no chat template (use /v1/completions, or "
                                  "--tokenizer-mode deepseek_v32 for a DeepSeek-V3.2 checkpoint)")
        for m in messages:  # templates iterate a tool call's arguments as a mapping
            if m["role"] == "developer":  # OpenAI's successor of system, which chat templates do not know
                m["role"] = "system"
            for call in m.get("tool_calls") or []:
                fn = call["function"]  # (normalize: a dict)
                args = fn.get("arguments")
                if args is None or isinstance(args, str):
                    fn["arguments"] = _json_object(args or "", fn.get("name"))
                elif not isinstance(args, dict):
                    raise ChatFormatError(f"tool call {fn.get('name')!r}: arguments must be a JSON object")
        return self.tok.hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final_message, tokenize=False,
                                               **kwargs)


def normalize(msg: dict[str, Any]) -> dict[str, Any]:
    """A plain-dict copy: text parts joined, null content as "", tool calls copied (templates mutate them)."""
    out = {k: v for k, v in msg.items() if v is not None}
    content = msg.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content if p.get("type") == "text")
    out["content"] = content or ""
    if msg.get("tool_calls"):
        if any(not isinstance(c.get("function"), dict) for c in msg["tool_calls"]):
            raise ChatFormatError("an assistant message's tool call needs its function: {'name': ..., 'arguments': "
                                  "...}")
        out["tool_calls"] = [{**c, "function": dict(c["function"])} for c in msg["tool_calls"]]
        if any(not isinstance(c["function"].get("name"), str) for c in out["tool_calls"]):
            raise ChatFormatError("an assistant message's tool call has no function name")
    return out


def results_in_call_order(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Both encodings pair tool results with the calls before them by position; OpenAI pairs them by
    tool_call_id. Where every result after a turn of calls names one of its calls (once), they are put in the
    calls' order; a tool_call_id that names none of them is an error. Results without ids stay as sent."""
    out = list(messages)
    for i, m in enumerate(out):
        calls = [c.get("id") for c in m.get("tool_calls") or []] if m["role"] == "assistant" else []
        if not calls:
            continue
        end = i + 1
        while end < len(out) and out[end]["role"] == "tool":
            end += 1
        ids = [r.get("tool_call_id") for r in out[i + 1:end]]
        if not ids or None in ids or None in calls or len(set(ids)) < len(ids):
            continue
        unknown = [r for r in ids if r not in calls]
        if unknown:  # (messages[j] as sent: the Responses and Messages APIs name their own item for it)
            raise ChatFormatError(f"messages[{i + 1 + ids.index(unknown[0])}]: the tool result's tool_call_id "
                                  f"{unknown[0]!r} names none of the calls of the assistant message before it "
                                  f"(messages[{i}]: {', '.join(map(repr, calls))})")
        out[i + 1:end] = sorted(out[i + 1:end], key=lambda r: calls.index(r["tool_call_id"]))
    return out


def _json_object(text: str, name: str | None) -> dict[str, Any]:
    try:
        value = json_text.loads(text or "{}")
    except ValueError as exc:
        raise ChatFormatError(f"tool call {name!r}: arguments are not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ChatFormatError(f"tool call {name!r}: arguments must be a JSON object")
    return value
