"""Prefill side: run the prompt, sample the first token (and, with MTP, its drafts), then write the prompt's
pages into the pages a decode server pre-allocated, and tell it the token.

A room's two halves arrive in any order: the request (through this server's HTTP API) and the decode
server's `dest` (its pages, on the control socket). The request waits outside the scheduler, holding no
pages, until its dest is there (so the two servers can never each hold pages for a request the other cannot
start: the decode server has its pages before the prefill takes any); then it is prefilled, parked after
its first token (its pages kept, out of the running batch) while the write runs, and ends once the decode
server has the token. Every wait is bounded; a request that cannot be handed over ends with an error, its
pages return to the pool and the decode server is told.

The transport's metadata and connection per receiver (a decode leader's NIXL agent) go a timeout after the last
write to it ended (two after a write given up on that still runs): a restarted decode server comes with a new agent,
so the old ones would otherwise pile up.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import zmq

from dsaserve.disagg import protocol as wire
from dsaserve.disagg.pages import PageCountMismatch, page_runs, transfer_pages
from dsaserve.disagg.sides import FAILURE_PROB_ENV, SideBase
from dsaserve.disagg.transport import TransferFailed
from dsaserve.engine.grammar_compile import compile_error, compiling
from dsaserve.engine.request import FinishReason, Request, RequestError, RequestOutput, RequestState

log = logging.getLogger(__name__)


@dataclass
class Dest:
    """A decode server's pages for a room."""
    peer: bytes  # its control socket identity
    msg: dict[str, Any]
    blob: bytes
    expires: float
    received: float = 0.0  # when the page ids came
    window: float = float("inf")  # the shorter of the two servers' timeouts: the decode server frees the pages
    # after its own, counted from when it sent them, so writes start within half of it and run a quarter

    @property
    def start_by(self) -> float:
        """The last moment a write into these pages may start."""
        return self.received + self.window / 2


@dataclass
class Pending:
    """A request waiting for its decode server's pages (not in the scheduler yet), and for its grammar's compile."""
    req: Request
    deadline: float
    since: float  # when it came


@dataclass
class Outgoing:
    req: Request
    first: tuple[int, Any]  # the first token and its logprob entry (None when not asked for)
    dest: Dest
    deadline: float = float("inf")  # for the write to finish
    handle: Any = None  # the write in flight
    pages: list[int] = field(default_factory=list)  # pages of an ended request, held until its write ends
    aborted: FinishReason | None = None  # how it ended while its write was in flight: `failed`, not `done`, then
    draining: float | None = None  # past its time and not cancellable: polled until it ends, up to this deadline


@dataclass
class PrefillSide(SideBase):
    dests: dict[int, Dest] = field(default_factory=dict)  # not claimed by a request yet
    pending: dict[int, Pending] = field(default_factory=dict)
    admitted: dict[int, Dest] = field(default_factory=dict)  # the dests of requests being prefilled
    out: dict[int, Outgoing] = field(default_factory=dict)
    ended: dict[int, tuple[FinishReason, float]] = field(default_factory=dict)  # rooms ended before their dest came
    receivers: dict[str, float] = field(default_factory=dict)  # transport agent -> when a write to it last ran

    def __post_init__(self) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port(f"tcp://{self.engine.args.host}")

    def info(self) -> dict[str, Any]:
        return {**super().info(), "control_port": self.port}

    def sockets(self) -> list[zmq.Socket]:
        return [self.sock]

    def queued(self) -> int:
        """Requests waiting for their decode server's pages (the server's `waiting` counts them)."""
        return len(self.pending)

    def queued_tokens(self) -> int:
        """Those requests' tokens (SGLang's load counts them)."""
        return sum(p.req.num_tokens for p in self.pending.values())

    def wait_ms(self) -> int | None:
        """How long the leader may block (its control socket wakes it too): None with nothing outgoing."""
        # (a request whose grammar still compiles is none to admit: the compiler's wake fd wakes the leader)
        if self.out or any(room in self.dests and not compiling(p.req) for room, p in self.pending.items()):
            return 1  # a write in flight (NIXL progresses without a socket) or ready to start; one to admit
        waits = [p.deadline for p in self.pending.values()] + [d.expires for d in self.dests.values()]
        waits += [d.start_by for room, d in self.dests.items() if room in self.pending]  # (compiling)
        return self.deadlines.ms_until(min(waits, default=None))

    def add(self, req: Request) -> None:
        """Checked now (the client learns at once); admitted to the scheduler when its dest comes."""
        room, sched = req.disagg.room, self.engine.scheduler
        if room in self.out or self._request_of(room) is not None:
            raise RequestError(f"bootstrap_room {room} is already in use on this prefill server")
        if room in self.ended:
            raise RequestError(f"bootstrap room {room} has ended on this prefill server: {self.ended[room][0].message}")
        # This server holds the prompt and its first token (and drafts) only: the decode server checks the rest.
        sched.check_fits(len(req.prompt_ids), req.max_new_tokens, cache_tokens=1)
        sched.check_queue(len(self.pending))
        self.pending[room] = Pending(req, self.deadlines.after(), self.deadlines.clock())

    def after_step(self, accepted: dict[str, tuple]) -> None:
        """Requests that sampled their first token (and made their drafts) leave the batch to be sent."""
        for rid, (_, lps) in accepted.items():
            req = self.engine.requests.get(rid)
            if req is None or req.disagg is None or req.state is not RequestState.RUNNING:
                continue
            self.engine.scheduler.park(req)
            lp = lps[0] if lps else None
            room = req.disagg.room
            self.out[room] = Outgoing(req, (req.output_ids[0], lp), self.admitted.pop(room))

    def refused(self, route: Any, message: str, status: int, code: str | None = None) -> None:
        """This server refused a request: the decode server's page ids for its room (now or when they come) are
        answered `failed`, with the refusal's status and code. Not when another request here holds the room."""
        room = route.room
        if room in self.out or room in self.ended or self._request_of(room) is not None:
            return
        self._ended(room, FinishReason("error", message=f"the prefill server refused it: {message}", status=status,
                                       code=code))

    def release(self, req: Request, reason: FinishReason) -> None:
        """The request ended here (aborted, or its step failed): the decode server is told why; pages under
        a write in flight wait for it to end."""
        room = req.disagg.room
        told = (FinishReason("abort", message="the request was aborted on the prefill server") if reason.kind == "abort"
                else FinishReason("error", message=f"the prefill server failed it: {reason.message}",
                                  status=reason.status, code=reason.code))
        self.pending.pop(room, None)
        dest, o = self.admitted.pop(room, None), self.out.get(room)
        if o is not None and o.handle is not None:
            o.pages, req.pages, o.aborted = req.pages, [], told
            return
        if o is not None:
            del self.out[room]
            dest = o.dest
        if dest is not None:
            wire.send(self.sock, failed(room, told), to=dest.peer)
        else:
            self._ended(room, told)

    # -- the loop ----------------------------------------------------------------------------

    def poll(self) -> list[RequestOutput]:
        now = self.deadlines.clock()
        for o in self.out.values():  # (before writes end below: a receiver is idle from its last write's end on)
            if o.handle is not None:
                self._used(o, now)
        outputs: list[RequestOutput] = []
        for ident, msg, blob in wire.recv_all(self.sock, routed=True):
            out = self._on_message(ident, msg, blob)
            if out is not None:
                outputs.append(out)
        outputs += self._admit()
        for room, o in list(self.out.items()):
            out = self._advance(room, o)
            if out is not None:
                outputs.append(out)
        now = self.deadlines.clock()
        for room in [r for r, d in self.dests.items() if d.expires <= now]:
            # Unclaimed: the request never came, or it ended before these page ids did and its `ended` entry went
            # (a busy decode pool, a longer decode timeout). Nothing was written: the decode server frees them now.
            message = (f"no request on the prefill server claimed the page ids for bootstrap room {room} within "
                       f"{self.deadlines.timeout_s:g} s (it never came, or it ended before they did)")
            reason = FinishReason("error", message=message)
            wire.send(self.sock, failed(room, reason), to=self.dests.pop(room).peer)
            self.ended[room] = (reason, self.deadlines.after())  # its request, if it comes now, is refused at once
        for room in [r for r, (_, t) in self.ended.items() if t <= now]:
            del self.ended[room]
        self._remove_idle_receivers(now)
        return outputs

    def _remove_idle_receivers(self, now: float) -> None:
        """Remove the receivers not written to for a timeout. By then their last write's arrival notice has long
        reached them; a write given up on that still runs keeps its receiver (the transport refuses) until it
        ends. The sender cannot tell a restarted decode server from another one (a new agent name, a new control
        socket identity, nothing else to match), so replaced and dead receivers go as idle ones do: a live one
        idle that long is added again, from the page ids' blob, by its next write (one connection setup)."""
        for agent in self.transport.remote_agents():  # (also those added by a write that then failed to start)
            self.receivers.setdefault(agent, now)
        for agent in [a for a, t in self.receivers.items() if now - t >= self.deadlines.timeout_s]:
            # A write given up on runs until its receiver progresses, which an idle or hung decode server never does:
            # its agent goes a timeout later still (NIXL forgets the write; it may land either way, see cancel()).
            if self.transport.remove_remote(agent, force=now - self.receivers[agent] >= 2 * self.deadlines.timeout_s):
                del self.receivers[agent]

    def _on_message(self, ident: bytes, msg: dict[str, Any], blob: bytes) -> RequestOutput | None:
        kind, room = msg.get("kind"), msg["room"]  # (an integer: wire.recv_all drops what names none)
        if kind == "dest":
            if room in self.ended:
                wire.send(self.sock, failed(room, self.ended.pop(room)[0]), to=ident)
            elif self._holder(room) is not None:  # the first one keeps the room
                wire.send(self.sock, {"kind": "failed", "room": room, "message": (
                    f"bootstrap room {room} already has a decode request on this prefill server: a room names one "
                    f"request (is the router reusing rooms?)")}, to=ident)
            else:
                mine = self.deadlines.timeout_s
                theirs = msg.get("timeout_s", mine)
                window = min(mine, float(theirs)) if isinstance(theirs, (int, float)) and theirs > 0 else mine
                self.dests[room] = Dest(ident, msg, blob, self.deadlines.after(), self.deadlines.clock(), window)
        elif kind == "cancel":
            return self._cancel(ident, room, f"the decode server cancelled it: {msg.get('reason')}")
        return None

    def _request_of(self, room: int) -> Request | None:
        """The live request of this room on this leader (pending, prefilling or parked), if any."""
        return next((r for r in self.engine.requests.values() if r.disagg and r.disagg.room == room), None)

    def _holder(self, room: int) -> bytes | None:
        """The decode server whose page ids this room holds (None: none yet)."""
        o = self.out.get(room)
        dest = self.dests.get(room) or self.admitted.get(room) or (o.dest if o is not None else None)
        return dest.peer if dest is not None else None

    def _cancel(self, ident: bytes, room: int, message: str) -> RequestOutput | None:
        holder = self._holder(room)
        if holder is not None and holder != ident:
            return None  # from a requester this room refused (another decode request holds it): not its to end
        self.dests.pop(room, None)
        o = self.out.get(room)
        if o is not None and o.handle is not None:  # writing: the decode server frees its pages when `done` or
            # `failed` comes; it has ended its request, so `failed` it will be
            o.aborted = o.aborted or FinishReason("abort", message=message)
            return None
        # nothing is written into the decode server's pages: it may free them now
        wire.send(self.sock, {"kind": "failed", "room": room, "message": "cancelled"}, to=ident)
        self.admitted.pop(room, None)
        req = o.req if o is not None else (self.pending.pop(room).req if room in self.pending else None)
        if req is None:
            req = self._request_of(room)
        if req is None or holder is None:  # not here yet: refused when it comes; page ids from any other
            # requester (another DP leader) answered at once: a failure there (that request's client did not abort)
            self.ended[room] = (FinishReason("error", message=message), self.deadlines.after())
        if req is None:
            return None
        reason = FinishReason("abort", message=message)
        if o is not None:
            del self.out[room]
            return self._end(o, reason)
        return self._end_live(req, reason)

    def _admit(self) -> list[RequestOutput]:
        """Pending requests whose dest came join the scheduler once their grammar compiled; those whose dest never
        came, or whose compile outlasts the time the dest's pages may be written in, end."""
        outputs = []
        for room, p in list(self.pending.items()):
            dest = self.dests.get(room)
            if dest is not None and not compiling(p.req):  # (the worker wakes when a compile ends)
                del self.pending[room]
                self.admitted[room] = self.dests.pop(room)
                if (problem := compile_error(p.req)) is not None:  # (the decode server hears it: release)
                    outputs.append(self.engine.fail_request(p.req, f"the output constraint did not compile: {problem}"))
                else:
                    self.engine.scheduler.add(p.req, checked=True)
            elif dest is not None and (self.deadlines.passed(dest.start_by)
                                       or self.deadlines.passed(p.deadline)):
                # Still compiling: no write could start in time now (_start would refuse the pages as too old).
                outputs.append(self._give_up(room, p, (
                    f"its output grammar was still compiling on the prefill server after "
                    f"{self.deadlines.clock() - p.since:.1f} s (the decode server's pages must be written within "
                    f"{dest.window / 2:g} s of their arrival)")))
            elif self.deadlines.passed(p.deadline):
                outputs.append(self._give_up(room, p, (
                    f"no decode server asked for bootstrap room {room} within {self.deadlines.timeout_s:g} s "
                    f"(is the decode server up?)")))
        return outputs

    def _give_up(self, room: int, p: Pending, message: str) -> RequestOutput:
        """End a pending request; the decode server is told (page ids that come later, e.g. from a busy decode pool,
        are answered at once)."""
        del self.pending[room]
        reason = FinishReason("error", message=message)
        self._ended(room, reason)
        return self.engine.end_request(p.req, reason)

    def _advance(self, room: int, o: Outgoing) -> RequestOutput | None:
        if o.handle is None:
            try:
                self._start(room, o)
            except (TransferFailed, PageCountMismatch) as exc:
                return self._fail(room, o, str(exc))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a malformed dest ends its request
                return self._fail(room, o, f"the decode server's page ids are malformed: {type(exc).__name__}: {exc}")
        try:
            if not self.transport.poll(o.handle):
                if not self.deadlines.passed(o.deadline):
                    return None
                if o.draining is None and not self.transport.cancel(o.handle):
                    # It may still land: the decode server holds its pages until this side answers, for two of its
                    # timeouts from sending them, and a timeout from hearing `draining` (those ids may have been
                    # read late here); this wait ends a window from now.
                    log.warning("bootstrap room %d: the KV write could not be cancelled; waiting for it to end", room)
                    o.draining = self.deadlines.clock() + o.dest.window
                    wire.send(self.sock, {"kind": "draining", "room": room}, to=o.dest.peer)
                if o.draining is not None and not self.deadlines.passed(o.draining):
                    return None
                if o.draining is not None and not self.transport.cancel(o.handle):
                    log.error("bootstrap room %d: a KV write still running is given up: it may land in pages the "
                              "decode server reuses", room)
                return self._fail(room, o, f"the KV write did not finish within {o.dest.window / 4:g} s")
        except TransferFailed as exc:
            return self._fail(room, o, str(exc))
        del self.out[room]
        if o.aborted is not None:  # the decode server must not continue a request that ended here
            wire.send(self.sock, failed(room, o.aborted), to=o.dest.peer)
            return self._end(o, FinishReason("abort", message=o.aborted.message))
        token, lp = o.first
        wire.send(self.sock, {"kind": "done", "room": room, "agent": self.transport.agent, "token": token,
                              "logprob": lp, "drafts": list(o.req.draft_ids)}, to=o.dest.peer)
        return self._end(o, FinishReason("length", message="prefilled; the decode server continues"))

    def _start(self, room: int, o: Outgoing) -> None:
        msg, req = o.dest.msg, o.req
        problem = self._mismatch(msg, req)
        if problem is not None:
            raise TransferFailed(problem)
        if self.deadlines.passed(o.dest.start_by):
            raise TransferFailed("the decode server's pages are too old to write safely (it may have given up)")
        if self.failure_prob and self.rng.random() < self.failure_prob:
            raise TransferFailed(f"injected transfer failure ({FAILURE_PROB_ENV}={self.failure_prob})")
        src = transfer_pages(req, self.page_size, int(msg.get("skip_pages", 0)))
        runs = page_runs(src, msg["pages"])
        o.handle = self.transport.write(msg["transport"], o.dest.blob, runs, wire.room_tag(room))
        self._used(o, self.deadlines.clock())
        o.deadline = self.deadlines.clock() + o.dest.window / 4

    def _used(self, o: Outgoing, now: float) -> None:
        agent = o.dest.msg["transport"].get("agent")  # (the fake transport names none)
        if agent is not None:
            self.receivers[agent] = now

    def _mismatch(self, msg: dict[str, Any], req: Request) -> str | None:
        spec = self.engine.spec_steps
        if msg.get("page_size") != self.page_size:
            return f"page sizes differ: decode {msg.get('page_size')}, prefill {self.page_size}"
        if msg.get("spec_steps") != spec:
            return f"speculative draft steps differ: decode {msg.get('spec_steps')}, prefill {spec}"
        if msg.get("weights") is None:
            return "the decode server sent no fingerprint of its weights: both servers must run the same dsaserve"
        if msg.get("weights") != self.weights_id:
            return (f"the servers loaded different models (weights or config.json; fingerprints: decode "
                    f"{msg.get('weights')}, prefill {self.weights_id}): both must load the same checkpoint")
        if msg.get("prompt_len") != len(req.prompt_ids) or msg.get("prompt_crc") != wire.prompt_crc(req.prompt_ids):
            return (f"the decode server has another prompt for this room ({msg.get('prompt_len')} tokens, "
                    f"prefill {len(req.prompt_ids)}): both servers must get the same request")
        problem = self.transport.check_peer(msg.get("transport") or {})
        mine = str(self.engine.runner.dtype).removeprefix("torch.")
        if problem is None and msg.get("dtype") != mine:  # (FP8 rows are alike, whatever dtype computed them)
            problem = f"--dtype differs: decode {msg.get('dtype')}, prefill {mine}"
        return problem

    def _fail(self, room: int, o: Outgoing, message: str) -> RequestOutput | None:
        log.warning("bootstrap room %d: %s", room, message)
        self.out.pop(room, None)
        wire.send(self.sock, failed(room, FinishReason("error", message=message)), to=o.dest.peer)
        return self._end(o, FinishReason("error", message=f"KV transfer to the decode server failed: {message}"))

    def _end(self, o: Outgoing, reason: FinishReason) -> RequestOutput | None:
        """The request's final output; pages return to the pool (an aborted request's, held here, too)."""
        if o.pages:
            self.engine.allocator.free(o.pages)
            o.pages = []
        return self._end_live(o.req, reason)

    def _end_live(self, req: Request, reason: FinishReason) -> RequestOutput | None:
        """Its final output, unless it ended already (aborted: that output went out then). By identity: once that
        output went out, the client may reuse the rid for a new request, which this must leave alone."""
        return self.engine.end_request(req, reason) if self.engine.requests.get(req.rid) is req else None

    def _ended(self, room: int, reason: FinishReason) -> None:
        dest = self.dests.pop(room, None)
        if dest is not None:
            wire.send(self.sock, failed(room, reason), to=dest.peer)
        else:
            self.ended[room] = (reason, self.deadlines.after())


def failed(room: int, reason: FinishReason) -> dict[str, Any]:
    """`failed`: the room's request ended here (or cannot be handed over); the decode half ends as it did, an abort
    as an abort and a refusal with its status (decode.prefill_ending)."""
    return {"kind": "failed", "room": room, "message": reason.message, "end": reason.kind, "status": reason.status,
            "code": reason.code}
