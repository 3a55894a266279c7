"""API errors: one exception type, rendered as an OpenAI-shaped body with the right status. Every
error the server answers has that shape: validation errors, bodies that do not decode, bodies the
guard refuses (server.guard) and unexpected exceptions (500)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsaserve.server.protocol import ErrorInfo, ErrorResponse

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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)


def bad_request(message: str, param: str | None = None) -> ApiError:
    code = "context_length_exceeded" if "context length" in message else "invalid_value"
    return ApiError(400, message, param=param, code=code)


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
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in kind.lower():  # (curl -d sends a form's type)
            return ApiError(400, "send the body as JSON, with the header Content-Type: application/json (got "
                                 f"{kind or 'no Content-Type'})", code="invalid_value").response()
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

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
            await ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()(scope, receive, send)
