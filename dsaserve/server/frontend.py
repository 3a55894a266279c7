"""Frontend: the request lifecycle in the HTTP process.

Routes each request to a DP group leader (round-robin or the request's routed_dp_rank) over a ZMQ
push/pull pair, waits for the leader to accept it (so rejections become HTTP errors before a stream
starts), and hands outputs, detokenized in a thread, to the routes as `Delta`s. Tokenization runs
in a thread too, so the event loop (health checks, streams) never waits on it.

Sends never block: commands collect in an outbox and go out once per event-loop turn as one
envelope per leader (server.outbox). The supervisor (server.supervisor) watches every rank
process; when one dies or hangs, the whole deployment is down: every request ends at once with a
503 that names the rank, and so does every new one.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import zmq
import zmq.asyncio

from dsaserve.disagg.serving import ONE_COMPLETION, refusal_leader
from dsaserve.engine.stats import EngineStats
from dsaserve.engine.request import DisaggRoute, RequestOutput, SamplingParams
from dsaserve.engine.tokenizer import Tokenizer
from dsaserve.server import messages as m
from dsaserve.server.errors import ApiError, bad_request, engine_error
from dsaserve.server.handles import Delta, EngineFailure, RequestHandle, detokenize_outputs
from dsaserve.server.metrics import ServerMetrics
from dsaserve.server.outbox import Outbox
from dsaserve.server.request_log import RequestLog
from dsaserve.server.supervisor import RankProcesses, watch
from dsaserve.server_args import ServerArgs

__all__ = ["Delta", "EngineFailure", "Frontend", "RequestHandle", "StartupError"]
log = logging.getLogger(__name__)
T = TypeVar("T")
# A leader's failure often follows a peer rank's death by milliseconds (its collective broke), before that rank is
# reaped: the frontend waits this long for it, so the reason names the cause (the killed rank), not the effect.
FATAL_CAUSE_WAIT_S = 0.5


class StartupError(RuntimeError):
    def __init__(self, message: str, setting: bool = False):
        """setting: a flag or the checkpoint cannot be served (the server exits 2, not 1)."""
        super().__init__(message)
        self.setting = setting


@dataclass
class RankLink:
    rank: int  # DP group
    push: zmq.Socket  # plain socket: sends never wait
    pull: zmq.asyncio.Socket
    info: dict[str, Any] = field(default_factory=dict)  # the leader's Ready info


class Frontend:
    def __init__(self, args: ServerArgs, endpoints: list[m.Endpoints], ranks: RankProcesses,
                 metrics: ServerMetrics):
        self.args, self.ranks, self.metrics = args, ranks, metrics
        self.ctx = zmq.asyncio.Context()
        self.links = [self._bind(r, e) for r, e in enumerate(endpoints)]
        self.handles: dict[str, RequestHandle] = {}
        self.groups: dict[str, list[str]] = {}  # response id of a batch / n > 1 call -> its engine rids
        self.info: dict[str, Any] = {}
        self.engine_stats: dict[int, EngineStats] = {}  # as last pushed by each DP leader
        self.tokenizer: Tokenizer | None = None
        self.shutting_down = False
        self.down: str | None = None  # why the deployment is gone
        self._rr = itertools.count()
        self.outbox = Outbox([link.push for link in self.links], self._unreachable)
        self.request_log = RequestLog(args.log_requests_level) if args.log_requests else None
        self._tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="tokenize")
        # /tokenize and /detokenize: their own thread, so megabytes of text there never delay a request's prompt
        self._endpoint_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize-endpoints")
        self._detokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="detokenize")
        self._receivers: list[asyncio.Task[None]] = []  # one per leader
        self._watcher: asyncio.Task[None] | None = None  # the supervisor
        self._reaper: asyncio.Future[None] | None = None
        self._fatal: asyncio.Future[None] | None = None  # a leader's Fatal, waiting for its cause

    def _bind(self, rank: int, ep: m.Endpoints) -> RankLink:
        push = zmq.Context.shadow(self.ctx.underlying).socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)  # never drop or block an abort
        push.setsockopt(zmq.LINGER, 0)
        push.bind(ep.requests)
        pull = self.ctx.socket(zmq.PULL)
        pull.bind(ep.outputs)
        return RankLink(rank, push, pull)

    # -- start / stop ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the ranks and wait until every leader has loaded its engine (StartupError if not)."""
        self.ranks.start()
        # The tokenizer loads while the ranks load their engines (seconds each; the model path is resolved).
        tokenizer = asyncio.get_running_loop().run_in_executor(self._tokenize_pool, Tokenizer, self.args.model_path,
                                                                  self.args.chat_template)
        try:
            for link in self.links:
                self.info = link.info = await self._wait_ready(link)
        except BaseException:  # the ranks' error is the one to report: the tokenizer's, if any, is retrieved
            tokenizer.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        self.tokenizer = await tokenizer
        self._start_receiving()
        self._watcher = asyncio.create_task(watch(self.ranks, self.fail_all))

    def _start_receiving(self) -> None:
        """One task per leader reads its events; one that ends on its own fails the deployment (_receiver_ended)."""
        self._receivers = [asyncio.create_task(self._receive(link)) for link in self.links]
        for link, task in zip(self.links, self._receivers):
            task.add_done_callback(lambda t, rank=link.rank: self._receiver_ended(rank, t))

    def _receiver_ended(self, rank: int, task: asyncio.Task[None]) -> None:
        """A leader's events are read no more (an error past _receive's handlers: a Rust panic in a tokenizer is
        no Exception): its requests would wait for ever, so the deployment fails, as when a rank dies."""
        if task.cancelled():  # (closing)
            return
        exc = task.exception()
        self.fail_all(f"the frontend stopped reading DP rank {rank}'s events: {type(exc).__name__}: {exc}")

    async def _wait_ready(self, link: RankLink) -> dict[str, Any]:
        while True:
            info = await self._startup_events(link, 200)
            if info is not None:
                return info
            problem = self.ranks.problem(hung_after=None)
            if problem is not None:  # a leader's own report says more than an exit code: wait for it briefly
                for other in self.links:
                    await self._startup_events(other, 500)
                raise StartupError(f"{problem} while starting", self.ranks.refused_a_setting())

    async def _startup_events(self, link: RankLink, timeout_ms: int) -> dict[str, Any] | None:
        """Ready's info, or None; raises StartupError with the leader's message if its start failed."""
        if not await link.pull.poll(timeout_ms):
            return None
        info = None
        for ev in await link.pull.recv_pyobj():
            if isinstance(ev, m.StartupFailed):
                raise StartupError(f"{self.ranks.name(link.rank * self.ranks.attn_tp)}: {ev.message}", ev.setting)
            if isinstance(ev, m.Stats):
                self.engine_stats[link.rank] = ev.stats
            if isinstance(ev, m.Ready):
                info = ev.info
        return info

    def begin_shutdown(self, message: str = "the server is shutting down") -> None:
        """Refuse new requests and abort the running ones (they end with finish reason abort)."""
        self.shutting_down = True
        self.abort_handles(list(self.handles.values()), message)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop every rank (Shutdown first: they leave their loops in one step), reap them, close."""
        if self._watcher is not None:
            self._watcher.cancel()  # ranks exiting now is expected
        self.outbox.put_last(m.Shutdown())  # (none once the deployment is down)
        deadline = time.monotonic() + timeout
        while self.ranks.any_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._receivers:
            task.cancel()
        if self._reaper is not None:
            await self._reaper
        await asyncio.to_thread(self.ranks.stop)
        for link in self.links:
            link.push.close(linger=0)  # made from a shadow of self.ctx: destroy() does not know them
        self.ctx.destroy(linger=0)
        for pool in (self._tokenize_pool, self._endpoint_pool, self._detokenize_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    # -- failure -----------------------------------------------------------------------------

    @property
    def problem(self) -> str | None:
        """Why the server cannot serve (None when it can)."""
        return self.down or ("the server is shutting down" if self.shutting_down else None)

    def fail_all(self, reason: str) -> None:
        """The deployment is gone: every request ends now (503, the reason), new ones too; reap the ranks."""
        if self.down is not None:
            return
        self.down = reason
        self.outbox.stopped = True
        log.error("%s; the deployment is down, failing its %d requests", reason, len(self.handles))
        for handle in self.handles.values():
            handle.fail(reason)
        self.handles.clear()
        self.groups.clear()
        self._reaper = asyncio.ensure_future(asyncio.to_thread(self.ranks.stop))

    # -- requests ----------------------------------------------------------------------------

    async def tokenize(self, fn: Callable[..., T], *args: Any, endpoint: bool = False) -> T:
        """Run a tokenizer call (encode, a chat template) in the tokenizer threads; endpoint: a /tokenize or
        /detokenize call, in a thread of its own."""
        pool = self._endpoint_pool if endpoint else self._tokenize_pool
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def encode(self, text: str) -> list[int]:
        self.check_prompt_chars(len(text))
        return await self.tokenize(self.tokenizer.encode, text)

    def check_prompt_chars(self, chars: int, param: str = "prompt") -> None:
        """A prompt longer than the context length could hold, at the most characters one token spells, is too
        long for certain: a 400 before a tokenizer thread spends seconds on megabytes of text (/tokenize too)."""
        context, per_token = self.info["context_length"], self.tokenizer.max_token_chars
        if chars > context * per_token:
            raise bad_request(f"the prompt has {chars} characters, more than the context length ({context} tokens) "
                              f"can hold at {per_token} characters per token at most", param=param)

    def route(self, dp_rank: int | None) -> int:
        n = len(self.links)
        if dp_rank is not None:
            if not 0 <= dp_rank < n:
                raise ApiError(400, f"routed_dp_rank must be in [0, {n}), got {dp_rank}", param="routed_dp_rank")
            return dp_rank
        return next(self._rr) % n

    @contextlib.contextmanager
    def refusing(self, route: DisaggRoute | None, dp_rank: int | None) -> Iterator[None]:
        """PD: an ApiError inside (this server refusing the request, here or in its engine) also ends the other
        server's half of the room, which would otherwise hold it (a decode server: its pages) until its timeout.
        Not while a live request of this server holds the room (a refused duplicate: the room is that one's; a
        decode server's DP leaders do not see each other's rooms, the frontend does). A prefill server's room
        belongs to leader room % dp (route's dp_rank), where the page ids come."""
        try:
            yield
        except ApiError as exc:
            live = {h.room for h in self.handles.values() if not h.finished}
            leader = refusal_leader(route, dp_rank, live, len(self.links))
            if leader is not None:
                self._send(leader, m.RefuseRoom(route, exc.message, exc.status, exc.code))
            raise

    async def submit(self, prompt_ids: list[int], params: SamplingParams, rid: str | None = None,
                     dp_rank: int | None = None, group: str | None = None,
                     route: DisaggRoute | None = None, scores_only: bool = False,
                     arrived: float | None = None) -> RequestHandle:
        """Queue one request on a leader; raises ApiError if it is rejected or the deployment fails.
        `scores_only`: its answer leaves out the tokens (streaming.prompt_scoring); `arrived`: when its HTTP
        request arrived (the latency metrics' start)."""
        if self.problem is not None:
            raise ApiError(503, self.problem)
        rank = self.route(dp_rank)
        rid = rid or uuid.uuid4().hex
        if rid in self.handles or rid in self.groups:  # one namespace: abort(rid) looks rid up as a call first
            raise ApiError(400, f"request id {rid!r} is already in use", param="rid")
        handle = RequestHandle(rid, rank, self.tokenizer, params, group, scores_only,
                               route.room if route is not None else None, arrived)
        if self.request_log is not None:
            handle.log_to(self.request_log, prompt_ids)
        self.handles[rid] = handle
        self._send(rank, m.AddRequest(rid, list(prompt_ids), params, route))
        try:
            await handle.accepted
        except asyncio.CancelledError:  # the client left before the leader answered: nobody will read it
            self.abort_handles([handle], "the client disconnected")
            raise
        except ApiError as exc:
            if self.request_log is not None:
                self.request_log.failed(rid, f"refused ({exc.status}): {exc.message}")
            raise
        return handle

    async def submit_many(self, prompts: list[list[int]], params: list[SamplingParams], base_rid: str,
                          dp_rank: int | None, route: DisaggRoute | None = None,
                          rids: list[str] | None = None, scores_only: bool = False,
                          arrived: float | None = None) -> list[RequestHandle]:
        """All or nothing: if one is rejected, the accepted ones are aborted. `base_rid` (the
        response id) names them all for /abort_request; each is `base_rid`-i, or rids[i] when given."""
        if route is not None and len(prompts) > 1:
            raise ApiError(400, ONE_COMPLETION, param="n")
        rids = rids or [f"{base_rid}-{i}" for i in range(len(prompts))]
        for rid in (base_rid, *rids):  # (a client's own rid, reused while it runs; a part id another request holds)
            if rid in self.groups or rid in self.handles:
                raise ApiError(400, f"request id {rid!r} is already in use", param="rid")
        self.groups[base_rid] = rids
        jobs = [self.submit(p, sp, rid, dp_rank, base_rid, route, scores_only, arrived)
                for p, sp, rid in zip(prompts, params, rids)]
        try:
            results = await asyncio.gather(*jobs, return_exceptions=True)
        except asyncio.CancelledError:  # the client left: the parts accepted already are nobody's (the others
            accepted = [h for h in self._parts(base_rid) if h.accepted.done() and not h.accepted.cancelled()]
            self.abort_handles(accepted, "the client disconnected")  # abort themselves: submit)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self._uncount(base_rid)
            self.abort_handles([r for r in results if isinstance(r, RequestHandle)],
                               "another prompt of the same call was rejected")
            self.groups.pop(base_rid, None)
            raise errors[0]
        return list(results)  # type: ignore[arg-type]

    def abort(self, rid: str, message: str = "aborted by the client") -> bool:
        """Abort a request by its engine id or by the response id the client saw."""
        return self.abort_handles(self._parts(rid) if rid in self.groups else
                                  [h for h in (self.handles.get(rid),) if h is not None], message) > 0

    def abort_handles(self, handles: list[RequestHandle], message: str) -> int:
        """Abort these requests, those still running (by identity: an ended one's id may name another's now);
        returns how many."""
        live = [h for h in handles if self.handles.get(h.rid) is h and not h.finished]
        for handle in live:
            self._send(handle.rank, m.AbortRequest(handle.rid, message))  # the final output arrives as usual
        return len(live)

    def _parts(self, group: str) -> list[RequestHandle]:
        """The running parts of call `group` (a part's id, once it ended, may name another client's request)."""
        return [h for r in self.groups.get(group, ()) if (h := self.handles.get(r)) is not None and h.group == group]

    def flush_cache(self) -> None:
        """Every leader drops the cached prefixes no request holds, before any request sent after this call."""
        for link in self.links:
            self._send(link.rank, m.FlushCache())

    def abort_all(self, message: str) -> int:
        """Abort every running request; returns how many."""
        return self.abort_handles(list(self.handles.values()), message)

    def stats(self) -> list[dict[str, Any]]:
        """Internal state per DP rank, as last pushed by its leader (never waits on an engine)."""
        states = []
        for link in self.links:
            base: dict[str, Any] = {"dp_rank": link.rank, "alive": self.down is None}
            st = self.engine_stats.get(link.rank)
            if self.down is not None or st is None:
                states.append({**base, "error": self.down or "no statistics yet"})
            else:
                states.append({**base, **dataclasses.asdict(st), "avg_spec_accept_length": st.avg_spec_accept_length})
        return states

    def _send(self, rank: int, command: m.Command) -> None:  # (every command to a leader passes here)
        self.outbox.put(rank, command)

    def _unreachable(self, rank: int) -> None:
        self.fail_all(self.ranks.problem() or f"the engine process of DP group {rank} is not reachable")

    # -- receiving ---------------------------------------------------------------------------

    async def _receive(self, link: RankLink) -> None:
        loop = asyncio.get_running_loop()
        while True:
            events = await link.pull.recv_pyobj()
            outputs = [(ev, self.handles.get(ev.rid)) for ev in events if isinstance(ev, RequestOutput)]
            outputs = [(ev, h) for ev, h in outputs if h is not None]
            deltas = await loop.run_in_executor(self._detokenize_pool, detokenize_outputs, outputs) if outputs else []
            delta_of = {id(ev): d for (ev, _), d in zip(outputs, deltas)}
            for ev in events:
                try:
                    self._dispatch(link, ev, delta_of.get(id(ev)))
                except Exception:  # one bad event must not stop this leader's outputs for everyone
                    log.exception("could not deliver an event from DP rank %d", link.rank)

    async def _fail_after_fatal(self, message: str) -> None:
        deadline = time.monotonic() + FATAL_CAUSE_WAIT_S
        while self.ranks.killed() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.fail_all(self.ranks.killed() or message)

    def _dispatch(self, link: RankLink, ev: m.Event, delta: Delta | None) -> None:
        if isinstance(ev, m.Stats):
            self.engine_stats[link.rank] = ev.stats
            return
        if isinstance(ev, m.Wake):  # PD: a leader's KV arrived; under DP attention every leader steps with it
            self.outbox.schedule()
            return
        if isinstance(ev, m.Fatal):  # a rank killed before it is the cause, the leader's failure the effect
            if self._fatal is None:
                self._fatal = asyncio.ensure_future(self._fail_after_fatal(ev.message))
            return
        handle = self.handles.get(ev.rid)
        if handle is None:
            return
        if isinstance(ev, m.Accepted):
            handle.accept()
        elif isinstance(ev, m.Rejected):
            self._uncount(handle.group)  # at once: its accepted parts' outputs may come before their abort
            self._forget(ev.rid)
            if not handle.accepted.done():
                handle.accepted.set_exception(engine_error(ev.status, ev.message))
        elif isinstance(ev, RequestOutput) and delta is not None:
            handle.on_output(delta, self.metrics)
            if ev.finished:
                self._forget(ev.rid)

    def _uncount(self, group: str | None) -> None:
        """A part of call `group` was refused: the call answers that error, none of its parts counts in the metrics."""
        for handle in self._parts(group or ""):
            handle.counted = False

    def _forget(self, rid: str) -> None:
        handle = self.handles.pop(rid, None)
        if handle is not None and handle.group is not None and not self._parts(handle.group):
            self.groups.pop(handle.group, None)
