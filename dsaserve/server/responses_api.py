"""/v1/responses answers: the chat pipeline's parsed output (reasoning, text, tool calls) as Responses output items,
whole or as the API's stream of events. One writer builds the items both ways: a non-streamed answer is the
stream's items with the events dropped, so the two cannot disagree."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import Request

from dsaserve.server.errors import ApiError
from dsaserve.server.openai_answers import (Call, chat_answer, reasoning_tokens, whole_delta, write_delta,
                                            written_stream)
from dsaserve.server.openai_api import OpenAIServing
from dsaserve.server.responses_protocol import ResponsesRequest
from dsaserve.server.responses_store import StoredResponse
from dsaserve.server.streaming import AbortingStream, aborter, collect_call


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# A reply's end as the response's status and the event that says it (OpenAI's: a cut reply is incomplete, in a
# response.incomplete event); an aborted request (/abort_request, a shutdown) is cancelled, and incomplete too.
ENDS = {"length": ("incomplete", "response.incomplete"), "abort": ("cancelled", "response.incomplete")}


class OutputWriter:
    """Output items as the reply's pieces arrive in order (reasoning, text, a tool call's name then its
    arguments), each piece extending the open item or closing it and opening the next; `events` collects the
    Responses stream's events for them."""

    def __init__(self, head: dict[str, Any]):
        self.head = head  # the response object's fields but status, output and usage
        self.items: list[dict[str, Any]] = []  # closed items, in order
        self.open: dict[str, Any] | None = None
        self.pieces: list[str] = []  # the open item's text (joined once, when it closes)
        self.events: list[str] = []
        self.seq = 0

    def emit(self, kind: str, **fields: Any) -> None:
        body = json.dumps({"type": kind, "sequence_number": self.seq, **fields})
        self.events.append(f"event: {kind}\ndata: {body}\n\n")
        self.seq += 1

    def response(self, status: str, usage: dict[str, Any] | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {**self.head, "status": status, "output": list(self.items), "usage": usage, "error": error,
                "incomplete_details": incomplete}

    def start(self) -> None:
        self.emit("response.created", response=self.response("in_progress"))
        self.emit("response.in_progress", response=self.response("in_progress"))

    def _ref(self, item: dict[str, Any]) -> dict[str, Any]:
        """Where an event's item is: its id and index in the output (the open item's is the next index)."""
        return {"item_id": item["id"], "output_index": len(self.items)}

    def _open(self, item: dict[str, Any], part: dict[str, Any] | None = None) -> dict[str, Any]:
        self.close()
        self.open = item
        self.emit("response.output_item.added", output_index=len(self.items), item=item)
        if part is not None:
            self.emit("response.content_part.added", **self._ref(item), content_index=0, part=part)
        return item

    def _text_item(self, kind: str) -> dict[str, Any]:
        """The open reasoning or message item, opened if another (or none) is."""
        if self.open is not None and self.open["type"] == kind:
            return self.open
        if kind == "reasoning":
            return self._open({"id": _id("rs"), "type": "reasoning", "summary": [], "content": [],
                               "status": "in_progress"}, {"type": "reasoning_text", "text": ""})
        return self._open({"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                           "content": []}, _output_text(""))

    def reasoning(self, text: str) -> None:
        if text:
            item = self._text_item("reasoning")
            self.pieces.append(text)
            self.emit("response.reasoning_text.delta", **self._ref(item), content_index=0, delta=text)

    def content(self, text: str) -> None:
        if text:
            item = self._text_item("message")
            self.pieces.append(text)
            self.emit("response.output_text.delta", **self._ref(item), content_index=0, delta=text, logprobs=[])

    def call(self, call_id: str, name: str) -> None:
        self._open({"id": _id("fc"), "type": "function_call", "call_id": call_id, "name": name, "arguments": "",
                    "status": "in_progress"})

    def arguments(self, text: str) -> None:
        assert self.open is not None and self.open["type"] == "function_call"
        self.pieces.append(text)
        self.emit("response.function_call_arguments.delta", **self._ref(self.open), delta=text)

    @property
    def reasoned(self) -> bool:
        """Whether the reply wrote reasoning."""
        return any(item["type"] == "reasoning" for item in [*self.items, *([self.open] if self.open else [])])

    def close(self, status: str = "completed") -> None:
        """The open item's done events; it joins the output."""
        item, self.open = self.open, None
        if item is None:
            return
        ref, text = self._ref(item), "".join(self.pieces)
        self.pieces = []
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            self.emit("response.reasoning_text.done", **ref, content_index=0, text=text)
            self.emit("response.content_part.done", **ref, content_index=0, part=part)
            item["content"] = [part]
        elif item["type"] == "message":
            self.emit("response.output_text.done", **ref, content_index=0, text=text, logprobs=[])
            self.emit("response.content_part.done", **ref, content_index=0, part=_output_text(text))
            item["content"] = [_output_text(text)]
        else:
            item["arguments"] = text
            self.emit("response.function_call_arguments.done", **ref, arguments=text)
        item["status"] = "incomplete" if status == "cancelled" else status
        self.emit("response.output_item.done", output_index=len(self.items), item=item)
        self.items.append(item)

    def finish(self, finish_reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        """The last item closes (incomplete when the reply was cut); an empty reply is an empty message. Returns
        the final response object."""
        status, event = ENDS.get(finish_reason or "", ("completed", "response.completed"))
        if self.open is None and not self.items:
            self._text_item("message")
        self.close(status)
        final = self.response(status, usage)
        self.emit(event, response=final)
        return final

    def fail(self, exc: Exception) -> None:
        self.close("incomplete")
        code = "invalid_prompt" if isinstance(exc, ApiError) and exc.status == 400 else "server_error"
        self.emit("response.failed", response=self.response("failed", error={"code": code, "message": str(exc)}))


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def head(body: ResponsesRequest, rid: str, model: str, store: bool) -> dict[str, Any]:
    """The response object's fields that echo the request."""
    return {"id": rid, "object": "response", "created_at": int(time.time()), "model": model,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": body.reasoning, "temperature": body.temperature, "top_p": body.top_p,
            "text": body.text or {"format": {"type": "text"}}, "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [], "truncation": "disabled", "metadata": body.metadata or {}, "user": body.user,
            "store": store}


def usage(prompt_tokens: int, output_tokens: int, cached: int, reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + output_tokens}


async def respond(request: Request, serving: OpenAIServing, call: Call, body: ResponsesRequest) -> Any:
    fe, think_end, prompt = serving.fe, serving.think_end_id, len(call.prompts[0])
    store = body.store is not False and serving.responses.capacity > 0
    writer = OutputWriter(head(body, call.rid, serving.served_name, store))

    def finish(finish_reason: str | None, output_ids: list[int], output_tokens: int, cached: int) -> dict[str, Any]:
        """The final response, kept (unless the client said not to, or it was cancelled) for previous_response_id."""
        thought = reasoning_tokens(output_ids, writer.reasoned, think_end)
        final = writer.finish(finish_reason, usage(prompt, output_tokens, cached, thought))
        if store and final["status"] != "cancelled":
            serving.responses.put(call.rid, StoredResponse(body.conversation_after(final["output"]), final))
        return final
    if body.stream:
        writer.start()
        ids: list[int] = []
        stream = written_stream(fe.tokenizer, call, writer, lambda d: ids.extend(d.token_ids),
                                lambda c, d: finish(c.finish_reason, ids, d.completion_tokens, d.cached_tokens))
        return AbortingStream(stream, aborter(fe, call.handles))
    results = await collect_call(request, fe, call.handles)
    choice = chat_answer(fe.tokenizer, serving.served_name, call, results).choices[0]
    write_delta(writer, whole_delta(choice.message))
    r = results[0]
    return finish(choice.finish_reason, r.token_ids, r.completion_tokens, r.cached_tokens)
