"""Frontend: the request lifecycle in the HTTP process.

Routes each request to a DP group leader (round-robin or the request's routed_dp_rank) over a ZMQ
push/pull pair, waits for the leader to accept it (so rejections become HTTP errors before a stream
starts), detokenizes outputs incrementally and hands them to the routes as `Delta`s. A leader
process that dies fails its in-flight requests and makes `healthy` false.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from dsaserve.engine.request import DisaggRoute, FinishReason, RequestOutput, SamplingParams
from dsaserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from dsaserve.server import messages as m
from dsaserve.server.errors import ApiError
from dsaserve.server.metrics import ServerMetrics
from dsaserve.server_args import ServerArgs

log = logging.getLogger(__name__)
MONITOR_INTERVAL_S = 0.25


class EngineFailure(Exception):
    """The leader serving a request died: the request ends with this message."""


class StartupError(RuntimeError):
    pass


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]]
    finish: FinishReason | None
    prompt_tokens: int
    completion_tokens: int


class RequestHandle:
    """One engine request as seen by a route: an accept future and a queue of outputs."""

    def __init__(self, rid: str, rank: int, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.rid, self.rank = rid, rank
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue: asyncio.Queue[RequestOutput | EngineFailure] = asyncio.Queue()
        self.finished = False
        self.created = self._last = time.monotonic()
        self._got_token = False
        self._detok = IncrementalDetokenizer(tokenizer)
        self._text, self._emitted = "", 0
        # Text that might be the start of a stop string is held back until it cannot be.
        self._hold = max((len(s) for s in stop), default=1) - 1

    def on_output(self, out: RequestOutput, metrics: ServerMetrics) -> None:
        now = time.monotonic()
        if out.new_token_ids:
            metrics.observe_tokens(len(out.new_token_ids), now - self._last, first=not self._got_token)
            self._got_token, self._last = True, now
        if out.finished:
            self.finished = True
            metrics.observe_finish(out.finish.kind, out.prompt_tokens, now - self.created)
        self.queue.put_nowait(out)

    def fail(self, message: str) -> None:
        self.finished = True
        if not self.accepted.done():
            self.accepted.set_exception(ApiError(503, message))
        self.queue.put_nowait(EngineFailure(message))

    async def deltas(self) -> AsyncIterator[Delta]:
        while True:
            out = await self.queue.get()
            if isinstance(out, EngineFailure):
                raise out
            yield Delta(self._text_delta(out), out.new_token_ids, out.new_logprobs, out.finish,
                        out.prompt_tokens, out.completion_tokens)
            if out.finished:
                return

    def _text_delta(self, out: RequestOutput) -> str:
        self._text += self._detok.add(out.new_token_ids)
        if out.finished:
            final = out.stop_text if out.stop_text is not None else self._text + self._detok.flush()
            piece, self._emitted = final[self._emitted:], len(final)
            return piece
        upto = max(self._emitted, len(self._text) - self._hold)
        piece, self._emitted = self._text[self._emitted:upto], upto
        return piece


@dataclass
class RankLink:
    rank: int
    push: zmq.asyncio.Socket
    pull: zmq.asyncio.Socket
    proc: BaseProcess
    dead: str | None = None  # why the leader is gone
    rids: set[str] = field(default_factory=set)
    info: dict[str, Any] = field(default_factory=dict)  # the leader's Ready info


class Frontend:
    def __init__(self, args: ServerArgs, endpoints: list[m.Endpoints], procs: list[BaseProcess],
                 metrics: ServerMetrics):
        self.args, self.metrics = args, metrics
        self.ctx = zmq.asyncio.Context()
        self.links = [self._bind(r, e, p) for r, (e, p) in enumerate(zip(endpoints, procs))]
        self.handles: dict[str, RequestHandle] = {}
        self.info: dict[str, Any] = {}
        self.tokenizer: Tokenizer | None = None
        self.shutting_down = False
        self._rr = itertools.count()
        self._tokens = itertools.count()
        self._stats: dict[int, tuple[int, asyncio.Future[m.Stats]]] = {}  # token -> (rank, answer)
        self._tasks: list[asyncio.Task[None]] = []  # one receiver per leader
        self._monitor_task: asyncio.Task[None] | None = None

    def _bind(self, rank: int, ep: m.Endpoints, proc: BaseProcess) -> RankLink:
        push, pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        push.setsockopt(zmq.SNDHWM, 0)  # never drop or block an abort
        push.bind(ep.requests)
        pull.bind(ep.outputs)
        return RankLink(rank, push, pull, proc)

    # -- start / stop ------------------------------------------------------------------------

    async def start(self) -> None:
        """Wait until every leader has loaded its engine; raise StartupError if one fails."""
        for link in self.links:
            self.info = link.info = await self._wait_ready(link)
        self.tokenizer = Tokenizer(self.info["model_path"])
        self._tasks = [asyncio.create_task(self._receive(link)) for link in self.links]
        self._monitor_task = asyncio.create_task(self._monitor())

    async def _wait_ready(self, link: RankLink) -> dict[str, Any]:
        while True:
            if await link.pull.poll(200):
                for ev in await link.pull.recv_pyobj():
                    if isinstance(ev, m.StartupFailed):
                        raise StartupError(f"DP rank {link.rank}: {ev.message}")
                    if isinstance(ev, m.Ready):
                        return ev.info
            elif not link.proc.is_alive():
                raise StartupError(f"the engine process of DP rank {link.rank} exited with code "
                                   f"{link.proc.exitcode} while starting")

    def begin_shutdown(self, message: str = "the server is shutting down") -> None:
        """Refuse new requests and abort the running ones (they end with finish reason abort)."""
        self.shutting_down = True
        for rid in list(self.handles):
            self.abort(rid, message)

    async def close(self, timeout: float = 5.0) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()  # leaders exiting now is expected, not a failure
        for link in self.links:
            if link.dead is None and link.proc.is_alive():
                try:  # a leader that is already exiting has no PULL peer: a blocking send would hang
                    await link.push.send_pyobj(m.Shutdown(), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
        deadline = time.monotonic() + timeout
        while any(link.proc.is_alive() for link in self.links) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        for link in self.links:
            stop_process(link.proc)
        self.ctx.destroy(linger=0)

    # -- requests ----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return not self.shutting_down and all(link.dead is None for link in self.links)

    def route(self, dp_rank: int | None) -> int:
        n = len(self.links)
        if dp_rank is not None:
            if not 0 <= dp_rank < n:
                raise ApiError(400, f"routed_dp_rank must be in [0, {n}), got {dp_rank}", param="routed_dp_rank")
            return dp_rank
        alive = [link.rank for link in self.links if link.dead is None] or [0]
        return alive[next(self._rr) % len(alive)]

    async def submit(self, prompt_ids: list[int], params: SamplingParams, rid: str | None = None,
                     dp_rank: int | None = None, route: DisaggRoute | None = None) -> RequestHandle:
        """Queue one request on a leader; raises ApiError if it is rejected."""
        if self.shutting_down:
            raise ApiError(503, "the server is shutting down")
        link = self.links[self.route(dp_rank)]
        if link.dead is not None:
            raise ApiError(503, link.dead)
        rid = rid or uuid.uuid4().hex
        if rid in self.handles:
            raise ApiError(400, f"request id {rid!r} is already in use", param="rid")
        handle = RequestHandle(rid, link.rank, self.tokenizer, params.stop)
        self.handles[rid] = handle
        link.rids.add(rid)
        try:
            await link.push.send_pyobj(m.AddRequest(rid, list(prompt_ids), params, route))
            await handle.accepted
        except asyncio.CancelledError:  # the client left before the leader answered: nobody will read it
            self.abort(rid, "the client disconnected")
            raise
        return handle

    async def submit_many(self, prompts: list[list[int]], params: list[SamplingParams], base_rid: str,
                          dp_rank: int | None, route: DisaggRoute | None = None) -> list[RequestHandle]:
        """All or nothing: if one is rejected, the accepted ones are aborted."""
        if route is not None and len(prompts) > 1:
            raise ApiError(400, "a request with bootstrap_room must have one prompt and n = 1", param="n")
        jobs = [self.submit(p, sp, f"{base_rid}-{i}", dp_rank, route) for i, (p, sp) in enumerate(zip(prompts, params))]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for r in results:
                if isinstance(r, RequestHandle):
                    self.abort(r.rid, "another prompt of the same call was rejected")
            raise errors[0]
        return list(results)  # type: ignore[arg-type]

    def abort(self, rid: str, message: str = "aborted by the client") -> bool:
        handle = self.handles.get(rid)
        if handle is None or handle.finished:
            return False
        link = self.links[handle.rank]
        if link.dead is None:
            link.push.send_pyobj(m.AbortRequest(rid, message))  # the final output arrives as usual
        return True

    async def stats(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """One entry of internal state per DP rank."""
        return list(await asyncio.gather(*(self._rank_stats(link, timeout) for link in self.links)))

    async def _rank_stats(self, link: RankLink, timeout: float) -> dict[str, Any]:
        base: dict[str, Any] = {"dp_rank": link.rank, "alive": link.dead is None}
        if link.dead is not None:
            return {**base, "error": link.dead}
        token = next(self._tokens)
        fut: asyncio.Future[m.Stats] = asyncio.get_running_loop().create_future()
        self._stats[token] = (link.rank, fut)
        try:
            await link.push.send_pyobj(m.StatsRequest(token))
            st = (await asyncio.wait_for(fut, timeout)).stats
        except (asyncio.TimeoutError, EngineFailure) as exc:
            return {**base, "error": str(exc) or "no answer from the engine process"}
        finally:
            self._stats.pop(token, None)
        return {**base, "running": st.running, "waiting": st.waiting, "free_pages": st.free_pages,
                "total_pages": st.total_pages, "num_retractions": st.num_retractions, "steps": st.steps}

    # -- background tasks --------------------------------------------------------------------

    async def _receive(self, link: RankLink) -> None:
        while True:
            for ev in await link.pull.recv_pyobj():
                try:
                    self._dispatch(link, ev)
                except Exception:  # one bad event must not stop this leader's outputs for everyone
                    log.exception("could not deliver an event from DP rank %d", link.rank)

    def _dispatch(self, link: RankLink, ev: m.Event) -> None:
        if isinstance(ev, m.Stats):
            _, fut = self._stats.get(ev.token, (None, None))
            if fut is not None and not fut.done():
                fut.set_result(ev)
            return
        handle = self.handles.get(ev.rid)
        if handle is None:
            return
        if isinstance(ev, m.Accepted):
            if not handle.accepted.done():  # cancelled when the client left before the answer
                handle.accepted.set_result(None)
        elif isinstance(ev, m.Rejected):
            self._forget(link, ev.rid)
            code = "queue_full" if ev.status == 503 else None
            if not handle.accepted.done():
                handle.accepted.set_exception(ApiError(ev.status, ev.message, code=code))
        elif isinstance(ev, RequestOutput):
            handle.on_output(ev, self.metrics)
            if ev.finished:
                self._forget(link, ev.rid)

    def _forget(self, link: RankLink, rid: str) -> None:
        self.handles.pop(rid, None)
        link.rids.discard(rid)

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            for link in self.links:
                if link.dead is None and not link.proc.is_alive():
                    self._rank_died(link)

    def _rank_died(self, link: RankLink) -> None:
        link.dead = f"the engine process of DP rank {link.rank} exited (code {link.proc.exitcode})"
        log.error("%s; failing its %d requests", link.dead, len(link.rids))
        for rid in list(link.rids):
            handle = self.handles.pop(rid, None)
            if handle is not None:
                handle.fail(link.dead)
        link.rids.clear()
        for rank, fut in self._stats.values():
            if rank == link.rank and not fut.done():
                fut.set_exception(EngineFailure(link.dead))


def stop_process(proc: BaseProcess, timeout: float = 3.0) -> None:
    """Terminate, then kill, a child that did not exit by itself; always reap it."""
    if proc.pid is None:
        return  # never started
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout)
    if proc.is_alive():
        proc.kill()
    proc.join(timeout)
