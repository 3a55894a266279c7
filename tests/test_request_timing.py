"""The server's latency metrics count from the HTTP request's arrival (RequestGuard stamps it before the body is
read), so parsing, chat templating and tokenizing, which can queue under load, are inside TTFT and e2e latency,
as a client measures them."""
from __future__ import annotations

import asyncio
import time

from prometheus_client import generate_latest
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from dsaserve.engine.request import FinishReason, SamplingParams
from dsaserve.server.guard import RequestGuard, arrival
from dsaserve.server.handles import Delta, RequestHandle
from dsaserve.server.metrics import ServerMetrics


def test_the_guard_stamps_the_arrival_before_the_route_runs() -> None:
    seen: list[float | None] = []

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(arrival(Request(scope, receive)))
        seen.append(time.monotonic())

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        pass

    before = time.monotonic()
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "state": {"x": 1}}
    asyncio.run(RequestGuard(route, limit=1 << 20)(scope, receive, send))
    stamped, at_route = seen
    assert stamped is not None and before <= stamped <= at_route
    assert scope["state"]["x"] == 1  # (the lifespan state the server put there stays)


def _metric(metrics: ServerMetrics, name: str) -> float:
    line = next(x for x in generate_latest(metrics.registry).decode().splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_ttft_and_e2e_latency_count_from_the_arrival() -> None:
    async def go() -> ServerMetrics:
        metrics = ServerMetrics()
        arrived = time.monotonic() - 30.0
        handle = RequestHandle("r", 0, None, SamplingParams(), arrived=arrived)  # type: ignore[arg-type]
        handle.on_output(Delta("a", [5], prompt_tokens=3, completion_tokens=1), metrics)
        handle.on_output(Delta("b", [6], finish=FinishReason("length"), prompt_tokens=3, completion_tokens=2), metrics)
        return metrics
    metrics = asyncio.run(go())
    assert _metric(metrics, "dsaserve_time_to_first_token_seconds_sum") >= 30.0
    assert _metric(metrics, "dsaserve_e2e_request_latency_seconds_sum") >= 30.0
    assert _metric(metrics, "dsaserve_inter_token_latency_seconds_sum") < 30.0  # (the gap after the first token)
