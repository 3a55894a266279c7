"""Prefill side: run the prompt, sample the first token (and, with MTP, its drafts), then write the prompt's
pages into the pages a decode server pre-allocated, and tell it the token.

A room's two halves arrive in any order: the request (through this server's HTTP API) and the decode
server's `dest` (its pages, on the control socket). The prefill starts at once; after its first token the
request is parked (its pages kept, out of the running batch) until the dest is there, the write is done
and the decode server has the token. Every wait is bounded; a request that cannot be handed over ends
with an error and its pages return to the pool.
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
from dsaserve.engine.request import FinishReason, Request, RequestError, RequestOutput, RequestState

log = logging.getLogger(__name__)


@dataclass
class Dest:
    """A decode server's pages for a room."""
    peer: bytes  # its control socket identity
    msg: dict[str, Any]
    blob: bytes
    expires: float


@dataclass
class Outgoing:
    req: Request
    first: tuple[int, Any]  # the first token and its logprob entry (None when not asked for)
    deadline: float  # for the dest to arrive, then for the write to finish
    handle: Any = None  # the write in flight
    dest: Dest | None = None
    pages: list[int] = field(default_factory=list)  # pages of an aborted request, held until its write ends
    aborted: bool = False  # by the client while its write was in flight: `failed`, not `done`, once it ends


@dataclass
class PrefillSide(SideBase):
    dests: dict[int, Dest] = field(default_factory=dict)
    out: dict[int, Outgoing] = field(default_factory=dict)
    ended: dict[int, tuple[str, float]] = field(default_factory=dict)  # rooms that ended before their dest came

    def __post_init__(self) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port(f"tcp://{self.engine.args.host}")

    def info(self) -> dict[str, Any]:
        return {"control_port": self.port}

    def sockets(self) -> list[zmq.Socket]:
        return [self.sock]

    def wait_ms(self) -> int | None:
        """How long the leader may block (its control socket wakes it too): None with nothing outgoing."""
        if any(o.handle is not None or room in self.dests or room in self.ended for room, o in self.out.items()):
            return 1  # a write in flight (NIXL progresses without a socket) or one ready to start
        return self.deadlines.ms_until(min((o.deadline for o in self.out.values()), default=None))

    def add(self, req: Request) -> None:
        room = req.disagg.room
        if room in self.out or any(r.disagg and r.disagg.room == room for r in self.engine.requests.values()):
            raise RequestError(f"bootstrap_room {room} is already in use on this prefill server")
        if room in self.ended:
            raise RequestError(f"bootstrap room {room} has ended on this prefill server: {self.ended[room][0]}")
        self.engine.scheduler.add(req)

    def after_step(self, accepted: dict[str, tuple]) -> None:
        """Requests that sampled their first token (and made their drafts) leave the batch to be sent."""
        for rid, (_, lps) in accepted.items():
            req = self.engine.requests.get(rid)
            if req is None or req.disagg is None or req.state is not RequestState.RUNNING:
                continue
            self.engine.scheduler.park(req)
            lp = lps[0] if lps else None
            self.out[req.disagg.room] = Outgoing(req, (req.output_ids[0], lp), self.deadlines.after())

    def release(self, req: Request) -> None:
        """The client aborted: nothing more is sent; pages under a write in flight wait for it to end."""
        room = req.disagg.room
        o = self.out.get(room)
        if o is None:
            self._ended(room, "the request was aborted on the prefill server")
            return
        if o.handle is not None:
            o.pages, req.pages, o.aborted = req.pages, [], True
            return
        del self.out[room]
        self._ended(room, "the request was aborted on the prefill server")

    # -- the loop ----------------------------------------------------------------------------

    def poll(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for ident, msg, blob in wire.recv_all(self.sock, routed=True):
            out = self._on_message(ident, msg, blob)
            if out is not None:
                outputs.append(out)
        for room, o in list(self.out.items()):
            out = self._advance(room, o)
            if out is not None:
                outputs.append(out)
        now = self.deadlines.clock()
        for room in [r for r, d in self.dests.items() if d.expires <= now]:
            del self.dests[room]
        for room in [r for r, (_, t) in self.ended.items() if t <= now]:
            del self.ended[room]
        return outputs

    def _on_message(self, ident: bytes, msg: dict[str, Any], blob: bytes) -> RequestOutput | None:
        kind, room = msg.get("kind"), msg.get("room")
        if not isinstance(room, int):
            return None
        if kind == "dest":
            if room in self.ended:
                wire.send(self.sock, {"kind": "failed", "room": room, "message": self.ended.pop(room)[0]}, to=ident)
            else:
                self.dests[room] = Dest(ident, msg, blob, self.deadlines.after())
        elif kind == "cancel":
            self.dests.pop(room, None)
            o = self.out.get(room)
            if o is not None and o.handle is not None:
                return None  # writing: the decode server frees its pages when `done` or `failed` comes
            # nothing is written into the decode server's pages: it may free them now
            wire.send(self.sock, {"kind": "failed", "room": room, "message": "cancelled"}, to=ident)
            if o is None:
                self.ended[room] = ("cancelled by the decode server", self.deadlines.after())
                return None
            del self.out[room]
            return self._end(o, FinishReason("abort", message=f"the decode server cancelled it: {msg.get('reason')}"))
        return None

    def _advance(self, room: int, o: Outgoing) -> RequestOutput | None:
        if o.dest is None:
            o.dest = self.dests.pop(room, None)
            if o.dest is None and room in self.ended:  # the decode server cancelled before it was prefilled
                del self.out[room]
                return self._end(o, FinishReason("abort", message=self.ended.pop(room)[0]))
            if o.dest is None:
                if self.deadlines.passed(o.deadline):
                    del self.out[room]
                    return self._end(o, FinishReason("error", message=(
                        f"no decode server asked for bootstrap room {room} within "
                        f"{self.deadlines.timeout_s:.0f} s (is the decode server up?)")))
                return None
            try:
                self._start(room, o)
            except (TransferFailed, PageCountMismatch) as exc:
                return self._fail(room, o, str(exc))
        try:
            if not self.transport.poll(o.handle):
                if self.deadlines.passed(o.deadline):
                    self.transport.cancel(o.handle)
                    return self._fail(room, o, f"the KV write did not finish within {self.deadlines.timeout_s / 4:.0f} s")
                return None
        except TransferFailed as exc:
            return self._fail(room, o, str(exc))
        del self.out[room]
        if o.aborted:  # the decode server must not continue a request its client aborted
            message = "the request was aborted on the prefill server"
            wire.send(self.sock, {"kind": "failed", "room": room, "message": message}, to=o.dest.peer)
            return self._end(o, FinishReason("abort", message=message))
        token, lp = o.first
        wire.send(self.sock, {"kind": "done", "room": room, "agent": self.transport.agent, "token": token,
                              "logprob": lp, "drafts": list(o.req.draft_ids)}, to=o.dest.peer)
        return self._end(o, FinishReason("length", message="prefilled; the decode server continues"))

    def _start(self, room: int, o: Outgoing) -> None:
        msg, req = o.dest.msg, o.req
        problem = self._mismatch(msg, req)
        if problem is not None:
            raise TransferFailed(problem)
        if self.deadlines.passed(o.dest.expires - self.deadlines.timeout_s / 2):
            raise TransferFailed("the decode server's pages are too old to write safely (it may have given up)")
        if self.failure_prob and self.rng.random() < self.failure_prob:
            raise TransferFailed(f"injected transfer failure ({FAILURE_PROB_ENV}={self.failure_prob})")
        src = transfer_pages(req, self.page_size, int(msg.get("skip_pages", 0)))
        runs = page_runs(src, msg["pages"])
        o.handle = self.transport.write(msg["transport"], o.dest.blob, runs, wire.room_tag(room))
        o.deadline = self.deadlines.after(0.25)

    def _mismatch(self, msg: dict[str, Any], req: Request) -> str | None:
        spec = self.engine.spec_steps
        if msg.get("page_size") != self.page_size:
            return f"page sizes differ: decode {msg.get('page_size')}, prefill {self.page_size}"
        if msg.get("spec_steps") != spec:
            return f"speculative draft steps differ: decode {msg.get('spec_steps')}, prefill {spec}"
        if msg.get("prompt_len") != len(req.prompt_ids) or msg.get("prompt_crc") != wire.prompt_crc(req.prompt_ids):
            return (f"the decode server has another prompt for this room ({msg.get('prompt_len')} tokens, "
                    f"prefill {len(req.prompt_ids)}): both servers must get the same request")
        return self.transport.check_peer(msg.get("transport") or {})

    def _fail(self, room: int, o: Outgoing, message: str) -> RequestOutput | None:
        log.warning("bootstrap room %d: %s", room, message)
        self.out.pop(room, None)
        if o.dest is not None:
            wire.send(self.sock, {"kind": "failed", "room": room, "message": message}, to=o.dest.peer)
        return self._end(o, FinishReason("error", message=f"KV transfer to the decode server failed: {message}"))

    def _end(self, o: Outgoing, reason: FinishReason) -> RequestOutput | None:
        """The request's final output; pages return to the pool (an aborted request's, held here, too)."""
        if o.pages:
            self.engine.allocator.free(o.pages)
            o.pages = []
        if o.req.rid not in self.engine.requests:  # aborted already: its final output went out then
            return None
        return self.engine.end_request(o.req, reason)

    def _ended(self, room: int, message: str) -> None:
        dest = self.dests.pop(room, None)
        if dest is not None:
            wire.send(self.sock, {"kind": "failed", "room": room, "message": message}, to=dest.peer)
        else:
            self.ended[room] = (message, self.deadlines.after())
