"""Request bodies are checked before any route parses them: a body over --max-request-bytes is a
413 as soon as the limit is passed (Content-Length or counted as it streams in), and JSON text
holding a lone surrogate (an escape like \\ud800 that no tokenizer can take) is a 400 naming the
field. Both answers are in the called API's shape (errors.ApiError.response)."""
from __future__ import annotations

import asyncio
import json
import re
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsaserve.chat import json_text
from dsaserve.server.errors import ApiError

# A high-surrogate escape not followed by a low one, or a low one not after a high one: look closer
# (valid pairs, e.g. every emoji that json.dumps escapes, are not parsed twice).
_LONE_SURROGATE_ESCAPE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F]")


class RequestGuard:
    """ASGI middleware: reads the body (at most `limit` bytes), checks it, then hands it on."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # Latency metrics count from here, as a client sees them: parsing, templating and tokenizing included
        scope.setdefault("state", {})["arrived"] = time.monotonic()
        length = dict(scope["headers"]).get(b"content-length", b"")
        too_large = ApiError(413, f"the request body is larger than {self.limit} bytes (--max-request-bytes)",
                             code="request_too_large")
        if length.isdigit() and int(length) > self.limit:
            return await too_large.response(scope["path"])(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client left before its body arrived
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large.response(scope["path"])(scope, receive, send)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = await asyncio.to_thread(lone_surrogate, body) if _LONE_SURROGATE_ESCAPE.search(body) else None
        if problem is not None:
            return await problem.response(scope["path"])(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # later messages (a disconnect) come from the connection
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay


def lone_surrogate(body: bytes) -> ApiError | None:
    """A 400 naming the first JSON string with a lone surrogate; None if there is none (or no JSON)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: the route's own parsing answers that
    found = json_text.lone_surrogate(data)
    if found is None:
        return None
    return ApiError(400, json_text.describe(found, "the body"), param=found[0] or None, code="invalid_value")


def arrival(request: Request) -> float | None:
    """When the request's body began to arrive (time.monotonic), as RequestGuard stamped it."""
    return getattr(request.state, "arrived", None)
