"""Decode side: pre-allocate pages for the prompt, hand their ids to the prefill DP leader that holds the
room, and wait (bounded) for its `done`: the first token, its drafts, and the pages written. The request
then joins the running batch with its prompt cached, exactly as if it had been prefilled here.

Pages that a prefill server may still write are never reused early: a request aborted or timed out
while its pages are out keeps them until the prefill server answers (a write it could not cancel ends in
`done` or `failed`), at most one more timeout.

A control socket per prefill leader address is kept while requests use it and closed a timeout after the last:
a restarted prefill server binds new ports, so sockets to the old ones would otherwise pile up.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import zmq

from dsaserve.chat.grammar import grammar_state
from dsaserve.disagg import protocol as wire
from dsaserve.disagg.pages import transfer_pages
from dsaserve.disagg.sides import SideBase
from dsaserve.disagg.transport import TransferFailed
from dsaserve.engine.grammar_compile import compiling
from dsaserve.engine.request import FinishReason, Request, RequestError, RequestOutput

log = logging.getLogger(__name__)


@dataclass
class Incoming:
    req: Request
    peer: str  # the prefill DP leader's control endpoint
    deadline: float
    since: float  # when it came
    sent: bool = False  # the prefill server has this request's page ids
    done: dict[str, Any] | None = None  # its `done`, until the data is seen to have landed
    pages: list[int] = field(default_factory=list)  # an ended request's pages, held until no write can come
    expired: bool = False  # its timeout passed with its page ids out and no answer: held one more timeout
    hold: float = float("-inf")  # a write the prefill server could not cancel may land until then (`draining`)


@dataclass
class DecodeSide(SideBase):
    rooms: dict[int, Incoming] = field(default_factory=dict)  # by arrival
    peers: dict[str, zmq.Socket] = field(default_factory=dict)  # by the prefill leader's control endpoint
    peer_used: dict[str, float] = field(default_factory=dict)  # when a message last went there or a room needed it

    def sockets(self) -> list[zmq.Socket]:
        return list(self.peers.values())

    def queued(self) -> int:
        """Requests waiting for free pages, before their page ids go out (the server's `waiting` counts them)."""
        return sum(not inc.sent for inc in self.rooms.values())

    def queued_tokens(self) -> int:
        """Those requests' tokens (SGLang's load counts them)."""
        return sum(inc.req.num_tokens for inc in self.rooms.values() if not inc.sent)

    def wait_ms(self) -> int | None:
        """How long the leader may block (the control sockets wake it too): None with nothing incoming."""
        if any(i.sent for i in self.rooms.values()):
            return 1  # a write may be coming: the backend progresses and its arrival is seen by polling
        return self.deadlines.ms_until(min((i.deadline for i in self.rooms.values()), default=None))

    def add(self, req: Request) -> None:
        room = req.disagg.room
        if req.disagg.prefill_control is None:
            raise RequestError("a decode server needs the prefill server's address for bootstrap room "
                               f"{room} (bootstrap_host and bootstrap_port)")
        if room in self.rooms:
            raise RequestError(f"bootstrap_room {room} is already in use on this decode server")
        self.engine.scheduler.check_fits(len(req.prompt_ids), req.max_new_tokens)
        self.engine.scheduler.check_queue(self.queued())
        waiting = any(not i.sent and self._live(i) for i in self.rooms.values())
        self.rooms[room] = Incoming(req, req.disagg.prefill_control, self.deadlines.after(), self.deadlines.clock())
        if not waiting:  # arrival order: a request does not take pages before one that waits for them
            try:
                self._try_send(room, self.rooms[room])
            except Exception:  # refused (the worker's answer): its room free again, the prefill half told
                del self.rooms[room]
                raise

    def after_step(self, accepted: dict[str, tuple]) -> None:
        pass

    def refused(self, route: Any, message: str, status: int, code: str | None = None) -> None:
        """This server refused a request (too long for its pool, queue full, bad input): the prefill server,
        which holds the room's other half until page ids come, ends it now instead of at its timeout. Not when
        another request here holds the room (the refusal is that one; its half is not ours to end)."""
        if route.prefill_control is None or route.room in self.rooms:
            return
        self._send(route.prefill_control, {"kind": "cancel", "room": route.room,
                                           "reason": f"the decode server refused it: {message}"})

    def release(self, req: Request, reason: FinishReason) -> None:
        """The request ended before its cache came (aborted): the prefill server is told, also when it has
        no page ids yet (it holds the request until they come); pages it may be writing are held until it
        answers."""
        room = req.disagg.room
        inc = self.rooms.get(room)
        if inc is None or inc.req is not req:
            return
        self._send(inc.peer, {"kind": "cancel", "room": room, "reason": reason.message or reason.kind})
        if not inc.sent:
            del self.rooms[room]
            return
        inc.pages, req.pages = req.pages, []

    # -- the loop ----------------------------------------------------------------------------

    def poll(self) -> list[RequestOutput]:
        now = self.deadlines.clock()
        for inc in self.rooms.values():  # (before rooms end below: a peer is idle from its last room's end on)
            self.peer_used[inc.peer] = now
        for sock in self.peers.values():
            for _, msg, _ in wire.recv_all(sock, routed=False):
                self._on_message(msg)
        if any(inc.sent and inc.done is None for inc in self.rooms.values()):
            try:
                self.transport.progress()
            except TransferFailed:  # the rooms waiting on it end by their timeouts, as with a silent peer
                log.exception("the transfer agent could not progress")
        receiving = any(inc.sent for inc in self.rooms.values())  # (progress() and arrived() take arrivals in)
        outputs = []
        blocked = False  # an earlier request waits for pages: later ones wait behind it (as admission does)
        for room, inc in list(self.rooms.items()):
            if not inc.sent and self._live(inc) and not blocked:
                try:
                    self._try_send(room, inc)
                except Exception as exc:  # noqa: BLE001 - this request's failure, not the server's
                    log.exception("bootstrap room %d: its page ids could not be sent", room)
                    self._cancel_quietly(inc.peer, room, f"its page ids could not be sent: {exc}")
                    outputs.append(self._close(room, inc, FinishReason("error", message=f"its page ids could not be "
                                                                                        f"sent: {exc}")))
                    continue
                blocked = not inc.sent
            out = self._advance(room, inc)
            if out is not None:
                outputs.append(out)
        if receiving:  # arrivals of rooms that ended (or end now) are never looked up: dropped
            self.transport.keep_arrivals({wire.room_tag(room) for room, inc in self.rooms.items() if inc.sent})
        self._close_idle_peers(now)
        return outputs

    def _close_idle_peers(self, now: float) -> None:
        """Close the sockets no request has needed for a timeout: every room refreshes its peer's use while it
        lives (answers for ended rooms are ignored anyway), and our last message there (a cancel) has had a timeout
        to go out before LINGER 0 drops it. A dead or replaced prefill server is not told apart from an idle one,
        and need not be: a live one idle that long costs one reconnect, on a socket that queues what is sent until
        it connects. (A bound on the count instead could close a socket that a request still waits on.)"""
        for peer in [p for p, t in self.peer_used.items() if now - t >= self.deadlines.timeout_s]:
            del self.peer_used[peer]
            sock = self.peers.pop(peer, None)
            if sock is not None:
                sock.close(linger=0)

    def _on_message(self, msg: dict[str, Any]) -> None:
        inc = self.rooms.get(msg.get("room"))
        if inc is None or not inc.sent:
            return
        if msg.get("kind") == "done":
            try:  # checked here: a malformed one fails its room as a failed transfer does
                inc.done = {"agent": str(msg["agent"]), "first": _first_token(msg)}
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                inc.done = {"failed": prefill_ending({"message": f"the prefill server's answer is malformed: "
                                                                 f"{type(exc).__name__}: {exc}"})}
        elif msg.get("kind") == "failed":
            inc.done = {"failed": prefill_ending(msg)}
        elif msg.get("kind") == "draining":  # it waits for that write at most a window (<= our timeout) from then:
            # the pages stay that long from now, even where they were sent long before the prefill server read them
            inc.hold = self.deadlines.after()

    def _live(self, inc: Incoming) -> bool:
        """Whether the room's request still runs here (not aborted, not timed out; a new request may have taken
        its id since)."""
        return not inc.expired and self.engine.requests.get(inc.req.rid) is inc.req

    def _advance(self, room: int, inc: Incoming) -> RequestOutput | None:
        ended = not self._live(inc)  # aborted by the client or timed out: only its pages are left
        if inc.done is not None and "failed" in inc.done:
            return self._close(room, inc, inc.done["failed"])
        ready = inc.done is not None and (ended or not compiling(inc.req))  # (a compile ends before it decodes)
        try:
            arrived = ready and self.transport.arrived(inc.done["agent"], wire.room_tag(room))
        except TransferFailed as exc:  # (the write ended at the sender: its pages are free of it)
            return self._close(room, inc, FinishReason("error", message=str(exc)))
        if arrived:
            del self.rooms[room]
            if ended:
                self._free(inc)
                return None
            return self._resume(inc.req, *inc.done["first"])
        if self.deadlines.passed(inc.deadline):
            if inc.done is None and not inc.expired:
                self._send(inc.peer, {"kind": "cancel", "room": room, "reason": "timed out on the decode server"})
            where = "no KV cache from the prefill server" if inc.sent else "no free pages for the prompt"
            message = f"{where} within {self.deadlines.timeout_s:g} s"
            if inc.done is not None and not ended and compiling(inc.req):  # (the cache came: not what it waited on)
                message = (f"its output grammar was still compiling on the decode server after "
                           f"{self.deadlines.clock() - inc.since:.1f} s")
            if inc.sent and inc.done is None and not inc.expired:
                # A write the prefill server could not cancel may still land: the pages wait for its answer to
                # the cancel (a write ends in `done` or `failed`), at most one more timeout.
                inc.expired, inc.deadline = True, self.deadlines.after()
                if ended:
                    return None
                inc.pages, inc.req.pages = inc.req.pages, []
                log.warning("bootstrap room %d: %s", room, message)
                return self.engine.end_request(inc.req, FinishReason("error", message=message))
            if inc.expired:
                if not self.deadlines.passed(inc.hold):
                    return None
                log.warning("bootstrap room %d: no answer from the prefill server; its pages are freed", room)
            return self._close(room, inc, FinishReason("error", message=message))
        return None

    def _resume(self, req: Request, token: int, logprob: tuple | None, drafts: list[int]) -> RequestOutput:
        """The prompt's KV cache arrived with the prefill server's first token (and its MTP drafts): the request
        decodes on as if it had been prefilled here."""
        engine = self.engine
        req.draft_ids = list(drafts)
        if engine.par.cfg.attn_tp > 1:  # the rest of the group copies them before the request's first step
            engine.arrived_pages += transfer_pages(req, self.page_size, req.cached_tokens // self.page_size)
        engine.scheduler.resume(req, len(req.prompt_ids))
        if req.params.grammar is not None:
            try:
                grammar_state(req, engine.cfg.vocab_size)
            except Exception as exc:  # noqa: BLE001 - this request alone (raised here, it would end the rank)
                log.exception("request %s: its grammar did not compile", req.rid)
                return engine.end_request(req, FinishReason("error", message=f"the output constraint did not "
                                                                            f"compile: {exc}"))
        return engine.commit_new_tokens(req, [token], [logprob] if logprob is not None else None)

    def _try_send(self, room: int, inc: Incoming) -> None:
        req = inc.req
        if not self.engine.scheduler.preallocate(req, len(req.prompt_ids)):
            return
        try:
            header, blob = self.transport.descriptor()
            skip = req.cached_tokens // self.page_size  # pages this server's prefix cache already holds
            pages = transfer_pages(req, self.page_size, skip)
            self._send(inc.peer, {"kind": "dest", "room": room, "prompt_len": len(req.prompt_ids),
                                  "prompt_crc": wire.prompt_crc(req.prompt_ids), "pages": pages, "skip_pages": skip,
                                  "page_size": self.page_size, "spec_steps": self.engine.spec_steps,
                                  "dtype": str(self.engine.runner.dtype).removeprefix("torch."),
                                  "weights": self.weights_id, "timeout_s": self.deadlines.timeout_s,
                                  "transport": header}, blob)
        except Exception:  # (the transfer agent's or the socket's): nothing went out, its pages go back
            self.engine.scheduler.remove(req)
            raise
        inc.sent = True
        # The prefill server starts writing within half the timeout of the page ids' arrival and gives a write
        # a quarter: counted from now, these pages outlive any write into them.
        inc.deadline = self.deadlines.after()

    def _close(self, room: int, inc: Incoming, reason: FinishReason) -> RequestOutput | None:
        del self.rooms[room]
        self._free(inc)
        if not self._live(inc):
            return None
        log.warning("bootstrap room %d: %s", room, reason.message)
        return self.engine.end_request(inc.req, reason)

    def _free(self, inc: Incoming) -> None:
        if inc.pages:
            self.engine.allocator.free(inc.pages)
            inc.pages = []

    def _cancel_quietly(self, peer: str, room: int, reason: str) -> None:
        """Tell the prefill half its request is over (else it holds a queue slot until its timeout), where the
        socket may be what failed."""
        try:
            self._send(peer, {"kind": "cancel", "room": room, "reason": reason})
        except Exception:  # noqa: BLE001 - the prefill half then ends by its timeout
            log.exception("bootstrap room %d: its cancel could not be sent either", room)

    def _send(self, peer: str, msg: dict[str, Any], blob: bytes = b"") -> None:
        sock = self.peers.get(peer)
        if sock is None:
            sock = self.peers[peer] = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(peer)
        self.peer_used[peer] = self.deadlines.clock()
        wire.send(sock, msg, blob)


def _first_token(done: dict[str, Any]) -> tuple[int, tuple | None, list[int]]:
    """(token, logprob, drafts) of a prefill server's `done`: its first token, that token's log-probability
    (chosen, [top...]) if asked for, its MTP drafts."""
    lp = done.get("logprob")
    logprob = (lp[0], [tuple(x) for x in lp[1]]) if lp else None
    return int(done["token"]), logprob, [int(t) for t in done["drafts"]]


def prefill_ending(msg: dict[str, Any]) -> FinishReason:
    """How a `failed` room ends here: as it ended on the prefill server (aborted there: an abort; refused there: an
    error with the refusal's status, which a router must not retry as a server fault), else a failed transfer."""
    message = msg.get("message") or "the prefill server gave no reason"
    status = msg.get("status")
    if msg.get("end") == "abort":
        return FinishReason("abort", message=message)
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status < 600 and status != 500:
        code = msg.get("code")
        return FinishReason("error", message=message, status=status, code=code if isinstance(code, str) else None)
    return FinishReason("error", message=f"KV transfer from the prefill server failed: {message}")
