"""The SSE keep-alive: a comment while a stream has nothing to send, the stream's own events unchanged."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from dsaserve.server.streaming import KEEPALIVE, with_keepalive


async def _events(delays: list[float], closed: list[str]) -> AsyncIterator[str]:
    try:
        for i, delay in enumerate(delays):
            await asyncio.sleep(delay)
            yield f"data: {i}\n\n"
    finally:
        closed.append("closed")


async def _collect(delays: list[float], every_s: float, limit: int | None = None) -> tuple[list[str], list[str]]:
    closed: list[str] = []
    out: list[str] = []
    stream = with_keepalive(_events(delays, closed), every_s)
    async for event in stream:
        out.append(event)
        if limit is not None and len(out) == limit:
            break
    await stream.aclose()
    return out, closed


def test_a_silent_stream_sends_comments_then_its_events() -> None:
    out, closed = asyncio.run(_collect([0.4, 0.0], every_s=0.05))
    events = [e for e in out if e != KEEPALIVE]
    assert events == ["data: 0\n\n", "data: 1\n\n"], out
    # (the first comment is due at 0.05 s, before the event at 0.4 s, however late the loop runs them)
    assert out[0] == KEEPALIVE, out
    assert out[-1] == "data: 1\n\n" and closed == ["closed"]


def test_events_that_keep_coming_get_no_comment() -> None:
    out, closed = asyncio.run(_collect([0.0] * 5, every_s=30.0))
    assert out == [f"data: {i}\n\n" for i in range(5)] and closed == ["closed"]


def test_closing_the_stream_while_it_waits_closes_its_source() -> None:
    """A client gone during a silence: the wrapper is closed while its source waits; the source's cleanup runs
    and no task is left behind."""
    async def run() -> tuple[list[str], list[str], int]:
        out, closed = await _collect([30.0], every_s=0.05, limit=2)
        return out, closed, len(asyncio.all_tasks()) - 1  # (this task)
    out, closed, tasks = asyncio.run(run())
    assert out == [KEEPALIVE, KEEPALIVE] and closed == ["closed"] and tasks == 0


def test_a_slow_reader_holds_the_source_back_and_errors_reach_it() -> None:
    """A client that reads slowly leaves the source's deltas where they merge (its request's queue): the source
    runs at most one event past what was read. The source's error is raised to the reader."""
    produced: list[int] = []

    async def source() -> AsyncIterator[str]:
        for i in range(10):
            produced.append(i)
            yield f"data: {i}\n\n"
        raise ValueError("the source failed")

    async def run() -> tuple[int, list[str], str]:
        stream = with_keepalive(source(), 30.0)
        first = await stream.__anext__()
        await asyncio.sleep(0.05)
        ahead = len(produced)
        rest = []
        try:
            async for event in stream:
                rest.append(event)
        except ValueError as exc:
            return ahead, [first] + rest, str(exc)
        return ahead, [first] + rest, ""

    ahead, events, error = asyncio.run(run())
    assert ahead <= 2 and events == [f"data: {i}\n\n" for i in range(10)] and error == "the source failed"
