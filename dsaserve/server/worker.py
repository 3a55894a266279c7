"""Rank processes: a DP group leader's loop (an Engine driven by add / abort / stats messages from
the frontend) and the loop of the other ranks of its group (they run the leader's plans).

A leader steps the engine while it has work (polling ZMQ without blocking), waits briefly for
messages when idle, and exits on Shutdown or when its parent process is gone (so a killed server
leaves no orphans behind). With DP attention (dp > 1) the leaders step in lockstep even when idle,
because another group's step needs every rank in its collectives.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any

import zmq

from dsaserve.engine.scheduler import QueueFull
from dsaserve.engine.request import RequestError
from dsaserve.server import messages as m
from dsaserve.server_args import ServerArgs

log = logging.getLogger(__name__)
IDLE_POLL_MS = 50  # how long an idle leader waits for messages before checking on its parent
LOCKSTEP_POLL_MS = 2  # idle DP leaders still step together: keep the shared step cadence short


def run_rank(args: ServerArgs, rank: int, endpoints: list[m.Endpoints], parent_pid: int, init_addr: str) -> None:
    """Process entry point (multiprocessing spawn) of one rank."""
    from dsaserve.parallel.launch import init_distributed
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    par = init_distributed(args, rank, init_addr)
    if par.cfg.is_leader:
        run_worker(args, par, endpoints[par.cfg.dp_rank], parent_pid)
    else:
        _follow(args, par)


def _follow(args: ServerArgs, par: Any) -> None:
    """A non-leader rank: run the leader's plans until any rank asks every rank to stop."""
    from dsaserve.engine.engine import Engine
    engine = Engine(args, progress=False, par=par)
    while not engine.last_sync.any_stop:
        engine.step()


def run_worker(args: ServerArgs, par: Any, endpoints: m.Endpoints, parent_pid: int) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(endpoints.requests)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(endpoints.outputs)
    try:
        engine = _build_engine(args, par, push)
        if engine is not None:
            WorkerLoop(engine, pull, push, parent_pid, lockstep=args.dp > 1).run()
    finally:
        pull.close(linger=0)
        push.close()
        ctx.term()


def _build_engine(args: ServerArgs, par: Any, push: zmq.Socket) -> Any:
    from dsaserve.engine.engine import Engine
    try:
        engine = Engine(args, progress=par.cfg.rank == 0, par=par)  # rank 0 shows the load progress
    except Exception as exc:  # reported to the frontend, which prints it and exits
        log.exception("engine start failed")
        push.send_pyobj([m.StartupFailed(f"{type(exc).__name__}: {exc}")])
        return None
    stats = engine.stats()
    push.send_pyobj([m.Ready({
        "model_path": engine.model_path, "context_length": engine.context_length,
        "vocab_size": engine.cfg.vocab_size, "model_type": getattr(engine.cfg, "model_type", None),
        "total_pages": stats.total_pages, "page_size": args.page_size,
        "eos_token_ids": sorted(engine.eos_ids), "num_hidden_layers": engine.cfg.num_hidden_layers,
        "disagg": engine.disagg.info() if engine.disagg is not None else None})])
    return engine


class WorkerLoop:
    def __init__(self, engine: Any, pull: zmq.Socket, push: zmq.Socket, parent_pid: int, lockstep: bool = False):
        self.engine, self.pull, self.push, self.parent_pid = engine, pull, push, parent_pid
        self.lockstep = lockstep
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            busy = self.engine.has_work() or self.engine.last_sync.any_work
            events = self._receive(0 if busy else (LOCKSTEP_POLL_MS if self.lockstep else IDLE_POLL_MS))
            if os.getppid() != self.parent_pid:
                log.warning("the server process is gone; exiting")
                return
            if self.stopping:  # Shutdown already ran the last, stopping step of every rank
                self.push.send_pyobj(events)
                return
            if self.engine.has_work() or self.lockstep:
                events += self.engine.step()
                if self.engine.last_sync.any_stop:  # another leader is shutting every rank down
                    events += self._abort_all("the server is shutting down")
                    self.stopping = True
            if events:
                self.push.send_pyobj(events)

    def _abort_all(self, message: str) -> list[m.Event]:
        for rid in list(self.engine.requests):
            self.engine.abort(rid, message)
        return list(self.engine.take_finished())

    def _receive(self, timeout_ms: int) -> list[m.Event]:
        events: list[m.Event] = []
        if not self._wait(timeout_ms):
            return events
        while True:
            try:
                msg = self.pull.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                return events
            events += self._handle(msg)

    def _wait(self, timeout_ms: int) -> bool:
        """Wait for a frontend message; PD control messages (engine.disagg) end the wait early too."""
        extra = self.engine.disagg.sockets() if self.engine.disagg is not None else []
        if not extra or timeout_ms == 0:
            return bool(self.pull.poll(timeout_ms))
        poller = zmq.Poller()
        for sock in [self.pull, *extra]:
            poller.register(sock, zmq.POLLIN)
        return self.pull in dict(poller.poll(timeout_ms))

    def _handle(self, msg: Any) -> list[m.Event]:
        if isinstance(msg, m.AddRequest):
            return [self._add(msg)]
        if isinstance(msg, m.AbortRequest):
            self.engine.abort(msg.rid, msg.message)  # its final output comes from the next step
            return []
        if isinstance(msg, m.StatsRequest):
            return [m.Stats(msg.token, self.engine.stats())]
        if isinstance(msg, m.Shutdown):
            self.stopping = True
            events = self._abort_all(msg.message)  # the abort outputs, so no stream is left hanging
            self.engine.step(stop=True)  # every other rank leaves its loop in this same step
            return events
        log.error("unknown message %r", type(msg).__name__)
        return []

    def _add(self, msg: m.AddRequest) -> m.Event:
        try:
            self.engine.add_request(msg.rid, msg.prompt_ids, msg.params, msg.route)
        except QueueFull as exc:
            return m.Rejected(msg.rid, str(exc), 503)
        except RequestError as exc:
            return m.Rejected(msg.rid, str(exc), 400)
        except Exception as exc:  # a bug must not take the leader down with it
            log.exception("add_request failed")
            return m.Rejected(msg.rid, f"{type(exc).__name__}: {exc}", 500)
        return m.Accepted(msg.rid)
