"""/v1/messages answers (Anthropic's Messages API): the chat pipeline's parsed output (reasoning, text, tool calls) as
content blocks, whole or as the API's stream of events. One writer builds the blocks both ways: a non-streamed
answer is the stream's blocks with the events dropped, so the two cannot disagree."""
from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from dsaserve.server import protocol as p
from dsaserve.server.errors import ApiError, anthropic_error
from dsaserve.server.openai_answers import Call, chat_answer, whole_delta, write_delta, written_stream
from dsaserve.server.openai_api import OpenAIServing
from dsaserve.server.streaming import AbortingStream, aborter, collect_call

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}  # chat finish_reason -> (else end_turn)
ABORTED = "the request was aborted before it finished (/abort_request, or the server shut down)"


class BlockWriter:
    """Content blocks as the reply's pieces arrive in order (thinking, text, a tool call's name then its input),
    each piece extending the open block or closing it and opening the next; `events` collects the stream's.
    (The method names are responses_api.OutputWriter's: openai_answers.write_delta feeds either.)"""

    def __init__(self, rid: str, model: str):
        self.message = {"id": rid, "type": "message", "role": "assistant", "model": model, "content": [],
                        "stop_reason": None, "stop_sequence": None}
        self.open: dict[str, Any] | None = None
        self.pieces: list[str] = []  # the open block's text (joined once, when it closes)
        self.events: list[str] = []
        self.started = False

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.append(f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n")

    def start(self, usage: dict[str, Any]) -> None:
        if not self.started:
            self.started = True
            self.emit("message_start", message={**self.message, "usage": usage})

    def _block(self, kind: str, **fields: Any) -> None:
        """The open block of this kind (text, thinking), opened if another (or none) is."""
        if self.open is None or self.open["type"] != kind or kind == "tool_use":
            self.close()
            self.open = {"type": kind, **fields}
            self.emit("content_block_start", index=len(self.message["content"]), content_block=self.open)

    def _delta(self, kind: str, key: str, text: str) -> None:
        self.pieces.append(text)
        self.emit("content_block_delta", index=len(self.message["content"]), delta={"type": kind, key: text})

    def reasoning(self, text: str) -> None:
        if text:
            self._block("thinking", thinking="", signature="")
            self._delta("thinking_delta", "thinking", text)

    def content(self, text: str) -> None:
        if text:
            self._block("text", text="")
            self._delta("text_delta", "text", text)

    def call(self, call_id: str, name: str) -> None:
        self._block("tool_use", id="toolu_" + call_id.removeprefix("call_"), name=name, input={})

    def arguments(self, text: str) -> None:
        assert self.open is not None and self.open["type"] == "tool_use"
        self._delta("input_json_delta", "partial_json", text)

    def close(self) -> None:
        block, self.open = self.open, None
        if block is None:
            return
        text, self.pieces = "".join(self.pieces), []
        key = {"text": "text", "thinking": "thinking"}.get(block["type"])
        block = {**block, key: text} if key else {**block, "input": json.loads(text) if text else {}}
        self.emit("content_block_stop", index=len(self.message["content"]))
        self.message["content"].append(block)

    def finish(self, choice: p.ChatChoice | p.ChatStreamChoice, usage: dict[str, Any]) -> dict[str, Any]:
        """The last block closes; the message's stop reason and usage. Returns the whole message."""
        if choice.finish_reason == "abort":
            raise ApiError(500, ABORTED)
        self.start(usage)
        self.close()
        stop = choice.matched_stop if isinstance(choice.matched_stop, str) else None
        reason = "stop_sequence" if stop is not None else STOP_REASONS.get(choice.finish_reason or "", "end_turn")
        self.message.update(stop_reason=reason, stop_sequence=stop, usage=usage)
        self.emit("message_delta", delta={"stop_reason": reason, "stop_sequence": stop}, usage=usage)
        self.emit("message_stop")
        return self.message

    def fail(self, exc: Exception) -> None:
        """An error mid-stream: the API's error event (the message ends without its stop)."""
        status = exc.status if isinstance(exc, ApiError) else 500
        self.emit("error", error=anthropic_error(status, str(exc))["error"])


def usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict[str, Any]:
    """Anthropic's usage: input_tokens are the prompt's tokens not read from the prefix cache."""
    return {"input_tokens": prompt_tokens - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": output_tokens}


async def respond(request: Request, serving: OpenAIServing, call: Call) -> Any:
    fe, prompt = serving.fe, len(call.prompts[0])
    writer = BlockWriter(call.rid, serving.served_name)
    if call.body.stream:
        stream = written_stream(fe.tokenizer, call, writer, lambda d: writer.start(usage(prompt, 0, d.cached_tokens)),
                                lambda c, d: writer.finish(c, usage(prompt, d.completion_tokens, d.cached_tokens)))
        return AbortingStream(stream, aborter(fe, call.handles))
    results = await collect_call(request, fe, call.handles)
    choice = chat_answer(fe.tokenizer, serving.served_name, call, results).choices[0]
    write_delta(writer, whole_delta(choice.message))
    r = results[0]
    return writer.finish(choice, usage(prompt, r.completion_tokens, r.cached_tokens))
