"""Helpers shared by the routes: collecting results, merging n streams, SSE with abort on disconnect."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from dsaserve.engine.request import FinishReason, RequestError, SamplingParams, logit_bias_pairs
from dsaserve.server.errors import ApiError, bad_request, engine_error
from dsaserve.server.frontend import Delta, EngineFailure, Frontend, RequestHandle
from dsaserve.server.protocol import sse

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


Result = Delta  # a request's whole output: its deltas absorbed in order


def prompt_token_logprobs(scored: list | None, prompt_len: int) -> list:
    """One (log-probability, top) entry per prompt token: the first token has none; the others are the
    engine's prompt log-probabilities, or none when they were not asked for."""
    return [(None, [])] + list(scored) if scored is not None else [(None, [])] * prompt_len


def bias_pairs(logit_bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias (token ids as JSON keys) as (id, bias) pairs; a key that is not an id is a 400."""
    try:
        return logit_bias_pairs(logit_bias or {})
    except RequestError as exc:
        raise bad_request(str(exc), param="logit_bias") from None


def prompt_scoring(max_tokens: int | None, min_tokens: int,
                   names: dict[str, str]) -> tuple[int | None, bool]:
    """(the engine's max_tokens, whether the answer scores the prompt only). max_tokens 0 (SGLang's
    max_new_tokens, legacy OpenAI completions') scores the prompt: the engine runs it for one token, which the
    answer leaves out (RequestHandle.scores_only). A refusal names both fields as the client spelt them (`names`,
    as `checked` takes: max_tokens -> max_new_tokens, min_tokens -> min_new_tokens)."""
    if max_tokens == 0 and min_tokens:
        max_name, min_name = names.get("max_tokens", "max_tokens"), names.get("min_tokens", "min_tokens")
        raise bad_request(f"{max_name} 0 scores the prompt only: {min_name} must be 0, got {min_tokens}",
                          param=max_name)
    return (1, True) if max_tokens == 0 else (max_tokens, False)


def checked(params: SamplingParams, names: dict[str, str] | None = None) -> SamplingParams:
    """Bad sampling values are a 400 before anything is queued, naming the field (`param`) as the client spelt it:
    `names` maps SamplingParams' names to the request's (max_tokens -> max_new_tokens)."""
    try:
        params.validate()
    except RequestError as exc:
        raise field_error(str(exc), names) from None
    return params


def field_error(message: str, names: dict[str, str] | None = None) -> ApiError:
    """A 400 for a bad-input message of the engine; one whose first word is a SamplingParams field names it
    (`param`, and in the message) as the client spelt it (`names`, as checked). One about the prompt itself
    (empty, past the context length: "the prompt ...") names the field that held it (`names["prompt"]`: messages,
    text, input_ids)."""
    names = names or {}
    if message.startswith("the prompt "):
        return bad_request(message, param=names.get("prompt", "prompt"))
    field = message.split(" ", 1)[0]
    if field not in SamplingParams.__dataclass_fields__:
        return bad_request(message)
    name = names.get(field, field)
    return bad_request(name + message[len(field):], param=name)


@contextlib.contextmanager
def engine_refusals_named(names: dict[str, str] | None = None) -> Iterator[None]:
    """Around submitting: the engine's refusal of a field (the prompt + max_tokens past the context length, the
    prompt alone) names the field the client sent (max_completion_tokens, /generate's max_new_tokens, messages), as
    checked() does."""
    try:
        yield
    except ApiError as exc:
        if exc.status != 400 or exc.param is not None:
            raise
        raise field_error(exc.message, names) from None


async def collect(handle: RequestHandle) -> Result:
    res = Result()
    try:
        async for d in handle.deltas():
            res.absorb(d)
    except EngineFailure as exc:
        raise ApiError(503, str(exc)) from None
    if res.finish is not None and res.finish.kind == "error":
        raise finish_error(res.finish)
    return res


async def collect_call(request: Request, frontend: Frontend, handles: list[RequestHandle]) -> list[Result]:
    """A non-streaming call's results, one per part in order: a failed part aborts the others (collect_all), a
    client that disconnects aborts them all."""
    failed_part = aborter(frontend, handles, "another part of the same call failed")
    return await until_disconnect(request, collect_all(handles, failed_part), aborter(frontend, handles))


async def collect_all(handles: list[RequestHandle], abort_rest: Callable[[], None]) -> list[Result]:
    """Every request's result, in order. The first failure (or a cancellation: a timeout, a disconnect) ends the
    call: the others are aborted, so their pages return now rather than after they run to the end."""
    tasks = [asyncio.ensure_future(collect(h)) for h in handles]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        abort_rest()
        raise


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of several requests as they arrive, tagged with the request's index; a consumer that fell behind
    gets each request's waiting deltas merged into one (RequestHandle.deltas)."""
    if len(handles) == 1:  # the common case: no pump task and second queue per token
        async for d in handles[0].deltas():
            yield 0, d
        return
    queue: asyncio.Queue[tuple[int, Delta | Exception | None]] = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        try:
            async for d in handle.deltas():
                queue.put_nowait((i, d))
        except EngineFailure as exc:
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            waiting = [await queue.get()]
            while not queue.empty():  # what queued meanwhile comes merged per request, as a single request's does
                waiting.append(queue.get_nowait())
            caught_up: dict[int, Delta] = {}
            failure: Exception | None = None
            for i, item in waiting:
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    failure = item  # (after the deltas that came before it)
                    break
                elif i in caught_up:
                    caught_up[i].absorb(item)  # (a request's finish is its last delta)
                else:
                    caught_up[i] = item
            for i, d in caught_up.items():
                yield i, d
            if failure is not None:
                raise failure
    finally:
        for t in tasks:
            t.cancel()


def split_error(d: Delta) -> tuple[Delta, FinishReason | None]:
    """A delta that ends its request in an error: (its tokens without the finish, the error), which a stream sends
    in that order; a merged delta holds the steps before the error, the client's as they would have been one event
    each. Any other delta: (it, None)."""
    if d.finish is None or d.finish.kind != "error":
        return d, None
    return dataclasses.replace(d, finish=None), d.finish


def finish_error(finish: FinishReason) -> ApiError:
    """The API error of a request that ended in an error: 400 where the request caused it, a PD peer's refusal's
    status."""
    return engine_error(finish.status, finish.message or "the request failed in the engine", finish.code)


def error_event(exc: Exception) -> str:
    err = exc if isinstance(exc, ApiError) else ApiError(503 if isinstance(exc, EngineFailure) else 500, str(exc))
    return sse(err.body())


def aborter(frontend: Frontend, handles: list[RequestHandle],
            reason: str = "the client disconnected") -> Callable[[], None]:
    def abort() -> None:
        frontend.abort_handles(handles, reason)
    return abort


KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it (the openai client among them)


async def with_keepalive(events: AsyncIterator[str], every_s: float) -> AsyncIterator[str]:
    """`events`, with a KEEPALIVE comment after every `every_s` seconds in which none came. A tool call is sent
    only once complete (chat/parsers.py), so a long one streams nothing while it is generated; proxies that close
    idle streams (nginx after 60 s by default) would cut it. One task pumps `events` into a queue, one event
    ahead at most, and a timer adds the comment when nothing came for `every_s` (about 6 us per event, one task
    switch; a task or a timeout per event cost 11-13 us); closing this closes `events`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str | None, BaseException | None]] = asyncio.Queue()  # (the end always fits)
    # One event ahead: a stream that falls behind leaves its deltas in its request's queue, where they merge.
    room = asyncio.Semaphore(1)
    last = loop.time()  # when the pump last queued an event (or the timer a comment)

    async def pump() -> None:
        nonlocal last
        error: BaseException | None = None
        try:
            source = events.__aiter__()
            while True:
                await room.acquire()  # before pulling: the source runs one event past the reader, no more
                try:
                    event = await source.__anext__()
                except StopAsyncIteration:
                    break
                queue.put_nowait((event, None))
                last = loop.time()
        except BaseException as exc:  # noqa: BLE001 - the stream's own error, raised where it is read
            error = exc
        finally:
            queue.put_nowait((None, error))

    def watch() -> None:
        nonlocal timer, last
        idle = loop.time() - last
        if idle >= every_s and queue.empty():  # (not empty: an event waits for the consumer)
            last, idle = loop.time(), 0.0
            queue.put_nowait((KEEPALIVE, None))
        timer = loop.call_later(max(every_s - idle, every_s / 10), watch)

    pumping = asyncio.create_task(pump())
    timer = loop.call_later(every_s, watch)
    try:
        while True:
            event, error = await queue.get()
            if error is not None:
                raise error
            if event is None:
                return
            if event is not KEEPALIVE:
                room.release()
            yield event
    finally:
        timer.cancel()
        pumping.cancel()
        with contextlib.suppress(BaseException):
            await pumping
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]


class AbortingStream(StreamingResponse):
    """An SSE response that watches for the client going away (even while no token flows) and
    then aborts its requests, so their pages return to the pool; a comment keeps it from looking idle."""
    keepalive_s = 15.0

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(with_keepalive(content, self.keepalive_s), media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def until_disconnect(request: Request, work: Awaitable[T], on_disconnect: Callable[[], None]) -> T:
    """Await `work`; if the client disconnects first, abort (the work then ends quickly)."""
    work_task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work_task.done():
        on_disconnect()
    return await work_task
