"""API errors: one exception type, rendered as an OpenAI-shaped body with the right status (Anthropic's shape on
/v1/messages). Every error the server answers has that shape: validation errors, bodies that do not decode, bodies
the guard refuses (server.guard) and unexpected exceptions (500). Also the translation of a chat error into the
APIs served over the chat pipeline (renamed, chat_request)."""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsaserve.server.protocol import ChatCompletionRequest, ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "internal_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=_TYPES.get(self.status, "error"),
                                             param=self.param, code=self.code))

    def response(self, path: str = "") -> JSONResponse:
        """The error in the shape of the API the request at `path` called (Anthropic's on /v1/messages)."""
        if path.startswith(ANTHROPIC_PATHS):
            return JSONResponse(anthropic_error(self.status, self.message), status_code=self.status)
        return JSONResponse(self.body().model_dump(), status_code=self.status)


# Anthropic's error types by status (its Messages API, /v1/messages)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error"}
ANTHROPIC_PATHS = "/v1/messages"  # the routes that answer errors in Anthropic's shape


def anthropic_error(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    code = "context_length_exceeded" if "context length" in message else "invalid_value"
    return ApiError(400, message, param=param, code=code)


def engine_error(status: int, message: str, code: str | None = None) -> ApiError:
    """The API error of a request the engine refused or ended in an error: `code` where the refusal had one (a PD
    peer's), else the status's (the same answer whether this server or, in PD, the other server decided it)."""
    if status == 400 and code is None:
        return bad_request(message)
    return ApiError(status, message, code=code or ("queue_full" if status == 503 else None))


def renamed(exc: ApiError, sources: list[str], words: dict[str, str], params: dict[str, str]) -> ApiError:
    """A chat completions error in the words of an API translated into it (/v1/responses, /v1/messages): chat
    message j named as the item that made it (sources[j]), each of `words` (regex -> replacement) replaced, the
    param renamed by `params`."""
    def source(match: re.Match[str]) -> str:
        i = int(match.group(1))
        return sources[i] if i < len(sources) else match.group(0)
    message = re.sub(r"\bmessages?[ .\[](\d+)\]?", source, exc.message)
    for word, replacement in words.items():
        message = re.sub(word, replacement, message)
    return ApiError(exc.status, message, params.get(exc.param or "", exc.param), exc.code)


def chat_request(fields: dict) -> ChatCompletionRequest:
    """The chat completions request another API's request translates to (its fields copied as they came, so a
    validation error names them as sent), or a 400."""
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise bad_request(f"{where}: {err.get('msg', 'invalid')}", param=where.split(".")[0]) from None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # loc holds the character position, not a field
            where = err.get("loc", ("body", "?"))[-1]
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON (at character {where}{': ' + detail if detail else ''})")
            continue
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """The handlers of the expected errors, and InternalErrors around the middlewares added before this call."""
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in kind.lower():  # (curl -d sends a form's type)
            message = f"send the body as JSON, with the header Content-Type: application/json (got {kind or 'none'})"
            return ApiError(400, message, code="invalid_value").response(request.url.path)
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param, code="invalid_value").response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response(request.url.path)

    app.add_middleware(InternalErrors)


class InternalErrors:
    """ASGI middleware: an unexpected exception (a bug) before the response starts is answered as a JSON 500, and
    the connection stays open. (Starlette's handler for Exception answers too, but then re-raises, and uvicorn
    closes the client's keep-alive connection: its next request on it failed.) After the response has started,
    a stream cannot be answered again: the exception goes on and the connection closes."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:
                raise
            log.error("unexpected error: %s: %s", type(exc).__name__, exc, exc_info=exc)
            error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}")
            await error.response(scope.get("path", ""))(scope, receive, send)
