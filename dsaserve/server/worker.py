"""Rank processes: a DP group leader's loop (an Engine driven by the frontend's envelopes) and the
loop of the other ranks of its group (they run the leader's plans).

Nobody spins and nobody's wait has a deadline. A leader steps while any rank has work; when every
rank agreed that nobody has, it blocks on its ZMQ socket until the next envelope. The other ranks
of its group block in the broadcast of the leader's next plan (a gloo group without a deadline).
With DP attention the leaders must step together: every leader gets every envelope epoch, each
exchange tells the lowest epoch any leader has seen, and a leader that has seen a later one steps
(the others will see it too). Every rank beats a heartbeat for the supervisor and exits when the
server process is gone.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, NoReturn

import zmq

from dsaserve.engine.request import QueueFull, RequestError, RequestOutput
from dsaserve.engine.warmup import freeze_startup_heap
from dsaserve.server import messages as m
from dsaserve.config import ConfigError
from dsaserve.model.checkpoint import CheckpointError
from dsaserve.server_args import ServerArgs, SettingError

log = logging.getLogger(__name__)
# A flag or the checkpoint cannot be served: one line naming it (no traceback), exit 2 (m.SETTING_EXIT)
SETTING_ERRORS = (SettingError, ConfigError, CheckpointError)
HEARTBEAT_S = 0.5
STATS_INTERVAL_S = 1.0  # statistics whose only change is a progress counter go out at most this often


def run_rank(args: ServerArgs, rank: int, endpoints: list[m.Endpoints], parent_pid: int, init_addr: str,
             beats: Any, slot: int) -> None:
    """Process entry point (multiprocessing spawn) of one rank."""
    from dsaserve.parallel.launch import init_distributed
    # Ctrl-C, and a SIGTERM sent to the whole group (systemd, kill -- -PGID), reach every rank too: the server
    # decides (it ends the running requests, then stops the ranks); a rank leaves when told or when it is gone
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    threading.Thread(target=_heartbeat, args=(beats, slot, parent_pid), daemon=True, name="heartbeat").start()
    try:
        par = init_distributed(args, rank, init_addr)
    except SETTING_ERRORS as exc:  # the nodes' flags disagree: one line, as an engine's refusal
        _refused_at_start(str(exc), rank, args.tp // args.dp, endpoints)
    if par.cfg.is_leader:
        stopped = run_worker(args, par, endpoints[par.cfg.dp_rank])
    else:
        stopped = _follow(args, par)
    if stopped:  # every rank left its loop in the same step
        par.close()


def _refused_at_start(message: str, rank: int, attn_tp: int, endpoints: list[m.Endpoints]) -> NoReturn:
    """Log the refusal; a DP group leader (node 0's) also tells the frontend, which prints it. Exit 2."""
    log.error("engine start failed: %s", message)
    if rank % attn_tp == 0 and rank // attn_tp < len(endpoints):
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(endpoints[rank // attn_tp].outputs)
        push.send_pyobj([m.StartupFailed(message, setting=True)])
        push.close()
        ctx.term()
    raise SystemExit(m.SETTING_EXIT)


def _heartbeat(beats: Any, slot: int, parent_pid: int) -> None:
    """Tell the supervisor this process is alive; leave when the server process is gone (no orphans)."""
    while True:
        if os.getppid() != parent_pid:
            log.warning("the server process is gone; exiting")
            os._exit(1)
        beats[slot] = time.monotonic()
        time.sleep(HEARTBEAT_S)


def _follow(args: ServerArgs, par: Any) -> bool:
    """A non-leader rank: run the leader's plans until any rank asks every rank to stop."""
    from dsaserve.engine.engine import Engine
    try:
        engine = Engine(args, progress=False, par=par)
    except SETTING_ERRORS as exc:  # its leader (if it fails too) reports it
        log.error("engine start failed: %s", exc)
        raise SystemExit(m.SETTING_EXIT) from None
    freeze_startup_heap()
    from dsaserve.engine.lockstep import follow  # (the engine's modules load in rank processes only)
    follow(engine)
    return True


def run_worker(args: ServerArgs, par: Any, endpoints: m.Endpoints) -> bool:
    """A DP group leader's loop; True once it stopped with every other rank (False: it never started)."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(endpoints.requests)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(endpoints.outputs)
    try:
        engine = _build_engine(args, par, push)
        if engine is None:
            return False
        try:
            WorkerLoop(engine, pull, push).run()
        except Exception as exc:  # logged, then told to the frontend (which takes the deployment down)
            log.exception("rank %d failed", par.cfg.rank)
            push.send_pyobj([m.Fatal(f"rank {par.cfg.rank} (DP group {par.cfg.dp_rank}) failed: "
                                     f"{type(exc).__name__}: {exc}")])
            raise
        return True
    finally:
        pull.close(linger=0)
        push.close()
        ctx.term()


def _build_engine(args: ServerArgs, par: Any, push: zmq.Socket) -> Any:
    from dsaserve.engine.engine import Engine
    try:
        engine = Engine(args, progress=par.cfg.rank == 0, par=par)  # rank 0 shows the load progress
    except SETTING_ERRORS as exc:  # names the flag or tensor: no traceback
        log.error("engine start failed: %s", exc)
        push.send_pyobj([m.StartupFailed(str(exc), setting=True)])
        return None
    except Exception as exc:  # reported to the frontend, which prints it and exits
        log.exception("engine start failed")
        push.send_pyobj([m.StartupFailed(f"{type(exc).__name__}: {exc}")])
        return None
    freeze_startup_heap()
    stats = engine.stats()
    push.send_pyobj([m.Ready({
        "model_path": engine.model_path, "context_length": engine.context_length,
        "vocab_size": engine.cfg.vocab_size, "model_type": getattr(engine.cfg, "model_type", None),
        "total_pages": stats.total_pages, "page_size": args.page_size,
        "eos_token_ids": sorted(engine.eos_ids), "num_hidden_layers": engine.cfg.num_hidden_layers,
        "disagg": engine.disagg.info() if engine.disagg is not None else None}), m.Stats(stats)])
    return engine


class WorkerLoop:
    def __init__(self, engine: Any, pull: zmq.Socket, push: zmq.Socket):
        self.engine, self.pull, self.push = engine, pull, push
        self.seen = 0  # epoch of the last envelope received
        self.stopping = False
        self._stats = _StatsPush(engine)

    def _should_step(self) -> bool:
        agreed = self.engine.last_sync
        return self.engine.has_work(compiling=False) or agreed.any_work or self.seen > agreed.epoch

    def run(self) -> None:
        while not self.stopping:
            events = self._receive(block=not self._should_step())
            outputs, wake = self._background()
            events += outputs
            if wake:  # with what happened before, in order: a request's Accepted must precede its final output
                self.push.send_pyobj([*events, m.Wake()])
                events = []
            if not self.stopping and self._should_step():
                events += self.engine.step(epoch=self.seen)
                if self.engine.last_sync.any_stop:  # another leader is shutting every rank down
                    events += self._abort_all("the server is shutting down")
                    self.stopping = True
            events += self._stats(idle=not self._should_step())
            if events:
                self.push.send_pyobj(events)

    def _abort_all(self, message: str) -> list[m.Event]:
        for rid in list(self.engine.requests):
            self.engine.abort(rid, message)
        return list(self.engine.take_finished())

    def _receive(self, block: bool) -> list[m.Event]:
        """Handle every envelope that is there; if `block`, first wait for one, however long."""
        events: list[m.Event] = []
        if block:
            self._wait()
        while not self.stopping:
            try:
                envelope = self.pull.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.seen = envelope.epoch
            for command in envelope.commands:
                events += self._handle(command)
        return events

    def _wait(self) -> None:
        """Block until an envelope comes or a grammar compile ends; with PD transfers pending, also until a control
        message from the other server or the transfers' next deadline (a write in flight: soon)."""
        disagg = self.engine.disagg
        poller = zmq.Poller()
        for sock in [self.pull, self.engine.grammars.wake_fd, *(disagg.sockets() if disagg is not None else [])]:
            poller.register(sock, zmq.POLLIN)
        poller.poll(disagg.wait_ms() if disagg is not None else None)

    def _background(self) -> tuple[list[RequestOutput], bool]:
        """PD transfers and grammar compiles advance without a step: (their outputs, whether the frontend must wake
        every leader now). A request whose KV cache arrived must decode, one whose page ids came must prefill, one
        whose grammar compiled must be scheduled: under DP attention every leader steps together, so the frontend
        is asked to wake them all first."""
        idle = not self.engine.has_work(compiling=False)
        # Compiles first: that drains the wake fd, so a compile ending after the PD sides' checks below (which keep
        # a request until its compile ended) still wakes the next _wait.
        outputs = self.engine.admit_compiled()
        outputs += self.engine.poll_transfers()  # (a prefill server admits requests whose page ids came)
        woke = idle and self.engine.has_work(compiling=False)
        return outputs, self.engine.args.dp > 1 and (woke or any(out.new_token_ids for out in outputs))

    def _handle(self, msg: m.Command) -> list[m.Event]:
        if isinstance(msg, m.AddRequest):
            return [self._add(msg)]
        if isinstance(msg, m.AbortRequest):
            self.engine.abort(msg.rid, msg.message)  # its final output comes from the next step
            return []
        if isinstance(msg, m.RefuseRoom):
            if self.engine.disagg is not None:
                self.engine.disagg.refused(msg.route, msg.message, msg.status, msg.code)
            return []
        if isinstance(msg, m.FlushCache):
            self.engine.evict_prefix_cache()  # (the leader's: the other ranks of its group run its plans)
            return []
        if isinstance(msg, m.Shutdown):
            self.stopping = True
            events = self._abort_all(msg.message)  # the abort outputs, so no stream is left hanging
            self.engine.step(stop=True, epoch=self.seen)  # every other rank leaves its loop in this same step
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


class _StatsPush:
    """Engine statistics for the frontend: pushed when the requests or pages change, and at most once
    a second when only progress counters (steps, speculative counts) moved. Reading never waits. The
    decision reads cheap counters; the full statistics (a prefix-cache walk) are made only to send."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.key, self.steps, self.at = engine.activity(), -1, 0.0

    def __call__(self, idle: bool = False) -> list[m.Event]:
        """`idle`: the loop is about to block; progress held back by the interval goes out now (it would
        stay stale until the next step: an idle DP group's step count, for one)."""
        now, key, steps = time.monotonic(), self.engine.activity(), self.engine.steps
        if key == self.key and (steps == self.steps or (now - self.at < STATS_INTERVAL_S and not idle)):
            return []
        self.key, self.steps, self.at = key, steps, now
        return [m.Stats(self.engine.stats())]
