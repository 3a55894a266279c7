"""FastAPI app: OpenAI routes, native /generate, health, server info, abort and metrics."""
from __future__ import annotations

import asyncio
import secrets
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

import dsaserve
from dsaserve.disagg.serving import PDRouting
from dsaserve.engine.request import SamplingParams
from dsaserve.server.errors import ApiError, install_error_handlers
from dsaserve.server.frontend import Frontend, RequestHandle
from dsaserve.server.guard import RequestGuard
from dsaserve.server.metrics import ServerMetrics
from dsaserve.server.openai_api import OpenAIServing
from dsaserve.server.native_routes import native_router
from dsaserve.server.openai_routes import openai_router
from dsaserve.server.streaming import Result, aborter, collect_all
from dsaserve.server_args import ServerArgs

HEALTH_GENERATE_TIMEOUT_S = 60.0


def create_app(args: ServerArgs, frontend: Frontend, metrics: ServerMetrics, served_name: str,
               pd: PDRouting) -> FastAPI:
    # With a key, no API docs: FastAPI's /docs, /redoc and /openapi.json would publish the schema to anyone
    app = FastAPI(title="dsaserve", version=getattr(dsaserve, "__version__", "0"),
                  openapi_url=None if args.api_key is not None else "/openapi.json")
    app.add_middleware(RequestGuard, limit=args.max_request_bytes)
    install_error_handlers(app)  # (its middleware around the guard's: a bug there is a JSON 500 too)
    # Browsers' cross-origin calls (a web UI on another port), as SGLang and vLLM allow by default
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"],
                       allow_credentials=True)

    async def require_key(request: Request) -> None:  # async: no thread pool hop per request
        if args.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")  # (Anthropic's)
        if not secrets.compare_digest(given.encode(), args.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                           code="invalid_api_key")

    open_routes = APIRouter()  # health checks and metrics stay reachable without a key
    _health_routes(open_routes, frontend, metrics)
    app.include_router(open_routes)
    serving = OpenAIServing(frontend, served_name, pd)
    app.include_router(openai_router(serving), dependencies=[Depends(require_key)])
    app.include_router(native_router(serving), dependencies=[Depends(require_key)])
    return app


def _health_routes(router: APIRouter, fe: Frontend, metrics: ServerMetrics) -> None:
    @router.get("/health")
    async def health() -> Response:
        if fe.problem is not None:
            raise ApiError(503, fe.problem)
        return Response(status_code=200)

    @router.get("/health_generate")
    async def health_generate() -> Response:
        """One greedy token on every DP rank proves that the whole path works."""
        await health()
        ids = await fe.encode("Hello")
        params = SamplingParams(max_tokens=1, temperature=0.0)

        handles: list[RequestHandle] = []
        abort = aborter(fe, handles, "the health check ended")  # (a timeout leaves nothing running)

        async def submit(rank: int) -> None:
            handles.append(await fe.submit(ids, params, f"health-{rank}-{time.monotonic_ns()}", rank))

        async def generate() -> list[Result]:  # the submits too: a leader stuck in a step never accepts
            # every submit ends before any failure is raised, so that the abort below finds all the handles
            submitted = await asyncio.gather(*(submit(link.rank) for link in fe.links), return_exceptions=True)
            failed = [r for r in submitted if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            return await collect_all(handles, abort)
        try:
            results = await asyncio.wait_for(generate(), HEALTH_GENERATE_TIMEOUT_S)
        except BaseException as exc:
            abort()
            if isinstance(exc, asyncio.TimeoutError):
                raise ApiError(503, f"no token within {HEALTH_GENERATE_TIMEOUT_S:.0f} s") from None
            raise
        if any(len(r.token_ids) != 1 for r in results):
            raise ApiError(503, "a health generation ended without a token")
        return Response(status_code=200)

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(fe.stats()), media_type=CONTENT_TYPE_LATEST)
