"""`dsaserve serve`: check the flags and the checkpoint, bind the port, start this node's rank
processes, then FastAPI + uvicorn here (node 0) or just watch the ranks (other nodes).

Shutdown (SIGTERM, Ctrl-C) at any moment: while starting, stop the ranks and exit 143 / 130; once
serving, refuse new requests, abort the running ones (they end with finish reason abort), let
uvicorn drain, then stop and reap every child and exit 0. Nothing cancels the main task, so the
cleanup (children, the temporary folder) always runs. Ranks also exit by themselves when this
process dies.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import uvicorn

from dsaserve import event_loop
from dsaserve.disagg.serving import PDRouting, start_bootstrap
from dsaserve.engine.warmup import freeze_startup_heap
from dsaserve.server.app import create_app
from dsaserve.server.frontend import Frontend, StartupError
from dsaserve.server.http_protocol import HttpProtocol
from dsaserve.server.messages import Endpoints
from dsaserve.server.metrics import ServerMetrics
from dsaserve.server.preflight import bind_listener, check_node0_ports, checked_args
from dsaserve.server.supervisor import RankProcesses, wait_for_ranks
from dsaserve.server_args import ServerArgs

log = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN_S = 5
# An idle keep-alive connection stays open longer than clients keep theirs (httpx and the openai SDK: 5 s,
# aiohttp: 15 s) and than load balancers' idle timeouts (60 s): at uvicorn's 5 s a client reusing a connection
# just as the server closed it got a reset (`ReadError`) for a request the server never read.
KEEP_ALIVE_S = 75


class _StopSignal:
    """SIGTERM / SIGINT outside uvicorn's own handling: remembered, and it sets an event; it never
    cancels a task (a cancelled main task would skip its cleanup)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event: asyncio.Event | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self)

    def __call__(self, sig: int, frame: object) -> None:
        self.signum = self.signum or sig
        if self.loop is not None and self.event is not None:
            self.loop.call_soon_threadsafe(self.event.set)

    def attach(self) -> asyncio.Event:
        self.loop, self.event = asyncio.get_running_loop(), asyncio.Event()
        if self.signum is not None:
            self.event.set()
        return self.event

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)


class _Server(uvicorn.Server):
    """uvicorn that prints one ready line, aborts requests on a signal, and does not re-raise it."""

    def __init__(self, config: uvicorn.Config, ready_line: str, on_exit: Callable[[], None], stop: _StopSignal):
        super().__init__(config)
        self.ready_line, self.on_exit, self.stop = ready_line, on_exit, stop

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[override]
        await super().startup(sockets)
        if self.started:
            freeze_startup_heap()
            protocol = next(c for c in self.config.http_protocol_class.__mro__ if c.__module__.startswith("uvicorn"))
            log.info("HTTP: %s on the %s event loop", protocol.__name__,
                     type(asyncio.get_running_loop()).__module__.split(".")[0])
            print(self.ready_line, flush=True)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal after its shutdown; we return an exit code instead.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        if self.stop.signum is not None:  # it came just before these handlers
            self.handle_exit(self.stop.signum, None)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        self.on_exit()


def serve(args: ServerArgs) -> int:
    """Run the server until a signal: 0 after a clean shutdown, 1 if it could not start, 2 for bad
    flags or a checkpoint that cannot be served, 128 + the signal if stopped while starting."""
    stop = _StopSignal()
    listener = None
    try:
        args = checked_args(args)  # the model's folder, resolved once here, not per rank
        if args.node_rank == 0:
            listener = bind_listener(args.host, args.port)
            check_node0_ports(args)
    except ValueError as exc:
        if listener is not None:
            listener.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if listener is None:
        return _serve_other_node(args, stop)
    try:
        return event_loop.run(_serve(args, listener, stop))
    finally:
        listener.close()


def _ipc_endpoints(root: Path, dp: int) -> list[Endpoints]:
    return [Endpoints(f"ipc://{root}/req-{r}", f"ipc://{root}/out-{r}") for r in range(dp)]


def _serve_other_node(args: ServerArgs, stop: _StopSignal) -> int:
    """Nodes other than 0 run ranks only (no DP leader, no HTTP); they end with node 0."""
    ranks = RankProcesses(args, [])
    ranks.start()
    print(f"dsaserve node {args.node_rank} running ranks {ranks.ranks}", flush=True)
    try:
        problem = wait_for_ranks(ranks, lambda: stop.signum is not None)
    finally:
        ranks.stop()
    if problem is None:
        return 0
    print(f"error: {problem}", file=sys.stderr)
    if stop.signum is not None:
        return stop.exit_code
    return 2 if ranks.refused_a_setting() else 1


async def _serve(args: ServerArgs, listener: socket.socket, stop: _StopSignal) -> int:
    root = Path(tempfile.mkdtemp(prefix="dsaserve-"))
    try:
        endpoints = _ipc_endpoints(root, args.dp)
        metrics = ServerMetrics()
        frontend = Frontend(args, endpoints, RankProcesses(args, endpoints), metrics)
        try:
            code = await _start(frontend, stop)
            return await _run_http(args, frontend, metrics, listener, stop) if code is None else code
        finally:
            await frontend.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _start(frontend: Frontend, stop: _StopSignal) -> int | None:
    """None once every leader is ready; else the exit code (1: it failed, 2: a flag or the checkpoint cannot be
    served, 128 + signal: stopped)."""
    starting = asyncio.ensure_future(frontend.start())
    signalled = asyncio.ensure_future(stop.attach().wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
    elif isinstance(exc := starting.exception(), StartupError):
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.setting else 1
    else:
        starting.result()  # anything else is a bug: raise it
    return stop.exit_code if stop.signum is not None else None


async def _run_http(args: ServerArgs, frontend: Frontend, metrics: ServerMetrics, listener: socket.socket,
                    stop: _StopSignal) -> int:
    loop = asyncio.get_running_loop()
    served = args.served_model_name or Path(args.model_path).name
    try:
        bootstrap = start_bootstrap(args, frontend)  # PD prefill side only
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pd = PDRouting(args, frontend.info, len(frontend.links))
    app = create_app(args, frontend, metrics, served, pd)
    config = uvicorn.Config(app, log_level=args.log_level.lower(), access_log=args.log_level.lower() == "debug",
                            lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            timeout_keep_alive=KEEP_ALIVE_S, http=HttpProtocol)
    ready = f"dsaserve ready on http://{args.host}:{args.port} (model {served})"
    server = _Server(config, ready, lambda: loop.call_soon_threadsafe(frontend.begin_shutdown), stop)
    try:
        await server.serve(sockets=[listener])
    finally:
        pd.close()
        if bootstrap is not None:
            bootstrap.close()
    return 0
