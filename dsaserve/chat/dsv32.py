"""DeepSeek-V3.2's chat encoding (DeepSeek publishes it as a Python encoding script, not a Jinja template).

The format, message by message (BOS first):
  system     its content, then "\\n\\n" + the "## Tools" block when it carries tools
  user       <｜User｜>content<｜Assistant｜> then <think> (thinking mode, last user turn) or </think>
  assistant  [reasoning</think> in thinking mode after the last user turn] content
             ["\\n\\n" + DSML function_calls block] <｜end▁of▁sentence｜>
  tool       results of one assistant turn share one "\\n\\n<function_results>...\\n</function_results>"
             block, one "\\n<result>...</result>" each, then "\\n\\n" + <think> or </think>
Reasoning of turns before the last user message is never rendered. Tools attach to the first message
when it is a system message, else to an implied empty system message put first.
"""
from __future__ import annotations

import json
from typing import Any

from dsaserve.chat import json_text

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"
CALLS_START, CALLS_END = f"<{DSML}function_calls>", f"</{DSML}function_calls>"
INVOKE_END, PARAM_END = f"</{DSML}invoke>", f"</{DSML}parameter>"

TOOLS_BLOCK = f"""## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "{CALLS_START}" block like the following as part of your reply to the user:
{CALLS_START}
<{DSML}invoke name="$FUNCTION_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAM_END}
...
{INVOKE_END}
<{DSML}invoke name="$FUNCTION_NAME2">
...
{INVOKE_END}
{CALLS_END}

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects \
should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for \
other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking \
block. Here is an example:

{CALLS_START}
...
{CALLS_END}

<function_results>
...
</function_results>

{THINK_START}...thinking about results{THINK_END}

Here are the functions available in JSONSchema format:
<functions>
{{schemas}}
</functions>
"""


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_tools(tools: list[dict[str, Any]]) -> str:
    """The "## Tools" block: one JSON line per function (the `function` object of an OpenAI tool)."""
    return TOOLS_BLOCK.replace("{schemas}", "\n".join(to_json(t.get("function", t)) for t in tools))


def render_invoke(call: dict[str, Any]) -> str:
    """One assistant tool call (OpenAI shape) in DSML: strings as they are, other values as JSON."""
    fn = call.get("function", call)
    args = fn.get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json_text.loads(args or "{}")
        except ValueError as exc:
            raise ValueError(f"tool call {fn.get('name')!r}: arguments are not valid JSON ({exc})") from None
    if not isinstance(args, dict):
        raise ValueError(f"tool call {fn.get('name')!r}: arguments must be a JSON object")
    params = [f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
              f'{v if isinstance(v, str) else to_json(v)}{PARAM_END}' for k, v in args.items()]
    return f'<{DSML}invoke name="{fn.get("name")}">\n' + "\n".join(params) + f"\n{INVOKE_END}"


class _MessageError(ValueError):
    """A problem with the message at `index` of the list the encoding renders."""

    def __init__(self, index: int, problem: str):
        super().__init__(f"message {index}: {problem}")
        self.index, self.problem = index, problem


def encode_messages(messages: list[dict[str, Any]], thinking: bool = False,
                    tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for `messages` (OpenAI shape); it ends where the assistant's reply begins."""
    messages, implied = [dict(m) for m in messages], 0
    if tools:
        if not messages or messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": ""})
            implied = 1
        messages[0]["tools"] = tools
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)
    try:
        return BOS + "".join(_render(i, messages, thinking, last_user) for i in range(len(messages)))
    except _MessageError as exc:  # errors name the client's message (not counting an implied system message)
        raise ValueError(f"message {exc.index - implied}: {exc.problem}") from None


def _render(i: int, messages: list[dict[str, Any]], thinking: bool, last_user: int) -> str:
    msg = messages[i]
    role, content = msg.get("role"), msg.get("content") or ""
    if role == "system":
        return content + ("\n\n" + render_tools(msg["tools"]) if msg.get("tools") else "")
    if role in ("user", "developer"):
        if role == "developer":
            if not content:
                raise _MessageError(i, "a developer message needs content")
            content = f"\n\n# The user's message is: {content}"
        opened = THINK_START if (i == last_user and thinking) else THINK_END
        return f"{USER}{content}{ASSISTANT}{opened}"
    if role == "tool":
        return _render_tool(i, messages, thinking, last_user)
    if role == "assistant":
        calls = msg.get("tool_calls") or []
        calls_text = ("\n\n" + CALLS_START + "\n" + "\n".join(render_invoke(c) for c in calls) + "\n" + CALLS_END
                      if calls else "")
        reasoning = ""
        if thinking and i > last_user:
            if not (msg.get("reasoning_content") or calls):
                raise _MessageError(i, "in thinking mode an assistant message after the last user message needs "
                                        "reasoning_content or tool_calls")
            reasoning = (msg.get("reasoning_content") or "") + THINK_END
        return reasoning + content + calls_text + EOS
    raise _MessageError(i, f"unknown role {role!r} (system, developer, user, assistant or tool)")


def _render_tool(i: int, messages: list[dict[str, Any]], thinking: bool, last_user: int) -> str:
    prev = i - 1
    while prev >= 0 and messages[prev].get("role") == "tool":
        prev -= 1
    calls = messages[prev].get("tool_calls") if prev >= 0 and messages[prev].get("role") == "assistant" else None
    order = i - prev  # 1 for the first result of that assistant turn
    if not calls or len(calls) < order:
        raise _MessageError(i, "a tool result needs an earlier assistant message with that many tool_calls")
    out = ("\n\n<function_results>" if order == 1 else "") + f"\n<result>{messages[i].get('content') or ''}</result>"
    if order == len(calls):
        out += "\n</function_results>\n\n" + (THINK_START if (i >= last_user and thinking) else THINK_END)
    return out
