"""`dsaserve serve`: start one engine process per DP group leader, then FastAPI + uvicorn here.

Shutdown (SIGTERM, Ctrl-C): refuse new requests, abort the running ones (they end with finish
reason abort), let uvicorn drain, then stop and reap every child. Leaders also exit by themselves
when this process dies.
"""
from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Callable, Iterator

import uvicorn

from dsaserve.disagg.serving import start_bootstrap
from dsaserve.server.app import create_app
from dsaserve.server.frontend import Frontend, StartupError, stop_process
from dsaserve.server.messages import Endpoints
from dsaserve.server.metrics import ServerMetrics
from dsaserve.parallel.launch import free_port, ranks_on_this_node
from dsaserve.server.worker import run_rank
from dsaserve.server_args import ServerArgs

GRACEFUL_SHUTDOWN_S = 5


class _Server(uvicorn.Server):
    """uvicorn that prints one ready line, aborts requests on a signal, and does not re-raise it."""

    def __init__(self, config: uvicorn.Config, ready_line: str, on_exit: Callable[[], None]):
        super().__init__(config)
        self.ready_line, self.on_exit = ready_line, on_exit

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[override]
        await super().startup(sockets)
        if self.started:
            print(self.ready_line, flush=True)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal after its shutdown; we return an exit code instead.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        self.on_exit()


def serve(args: ServerArgs) -> int:
    """Run the server until a signal; 0 on a clean shutdown, 1 if it could not start."""
    from dsaserve.tiny import default_model_path
    if args.model_path is None:
        args = args.replace(model_path=str(default_model_path()))  # made once here, not per rank
    problem = _multi_node_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.node_rank > 0:
        return _serve_other_node(args)
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:  # Ctrl-C while the model was loading: children were stopped in _serve
        return 130


def _ipc_endpoints(root: Path, dp: int) -> list[Endpoints]:
    return [Endpoints(f"ipc://{root}/req-{r}", f"ipc://{root}/out-{r}") for r in range(dp)]


def _multi_node_problem(args: ServerArgs) -> str | None:
    if args.nnodes == 1:
        return None
    if args.dist_init_addr is None:
        return "--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)"
    if args.tp % args.nnodes:
        return f"--tp ({args.tp}) must be divisible by --nnodes ({args.nnodes})"
    last_leader = (args.dp - 1) * (args.tp // args.dp)
    if last_leader >= args.tp // args.nnodes:
        return (f"every DP group leader must run on node 0 (it talks to the HTTP frontend), but rank "
                f"{last_leader} leads DP group {args.dp - 1}: use fewer DP groups or fewer nodes")
    return None


def _rank_processes(args: ServerArgs, endpoints: list[Endpoints]) -> list[BaseProcess]:
    init_addr = args.dist_init_addr or f"127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    return [ctx.Process(target=run_rank, args=(args, r, endpoints, os.getpid(), init_addr), name=f"dsaserve-rank{r}")
            for r in ranks_on_this_node(args)]


def _serve_other_node(args: ServerArgs) -> int:
    """Nodes other than 0 run ranks only (no DP leader, no HTTP); they end with node 0."""
    procs = _rank_processes(args, [])
    for proc in procs:
        proc.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"dsaserve node {args.node_rank} running ranks {[p.name for p in procs]}", flush=True)
    try:
        for proc in procs:
            proc.join()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        for proc in procs:
            stop_process(proc)
    return 0 if all(p.exitcode == 0 for p in procs) else 1


async def _serve(args: ServerArgs) -> int:
    root = Path(tempfile.mkdtemp(prefix="dsaserve-"))
    endpoints = _ipc_endpoints(root, args.dp)
    procs = _rank_processes(args, endpoints)
    leaders = [procs[g * (args.tp // args.dp)] for g in range(args.dp)]
    metrics = ServerMetrics()
    frontend = Frontend(args, endpoints, leaders, metrics)
    early = _EarlyStop(asyncio.get_running_loop(), asyncio.current_task())
    signal.signal(signal.SIGTERM, early)  # loading can take minutes: stay stoppable until uvicorn takes over
    try:
        if not await _start(frontend, procs) or early.requested:
            return 143 if early.requested else 1
        return await _run_http(args, frontend, metrics)
    except asyncio.CancelledError:  # SIGTERM before uvicorn took over
        return 143
    finally:
        await _stop(frontend, procs)
        shutil.rmtree(root, ignore_errors=True)


class _EarlyStop:
    """A SIGTERM handler for start-up: a plain signal handler (not the loop's, whose wakeup byte is
    dropped if the handler is removed before the loop reads it), so no signal is ever lost."""

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task | None):
        self.loop, self.task, self.requested = loop, task, False

    def __call__(self, sig: int, frame: object) -> None:
        self.requested = True
        if self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)


async def _start(frontend: Frontend, procs: list[BaseProcess]) -> bool:
    try:
        for proc in procs:
            proc.start()
        await frontend.start()
        return True
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False


async def _run_http(args: ServerArgs, frontend: Frontend, metrics: ServerMetrics) -> int:
    loop = asyncio.get_running_loop()
    served = args.served_model_name or Path(args.model_path).name
    try:
        bootstrap = start_bootstrap(args, frontend)  # PD prefill side only
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    app = create_app(args, frontend, metrics, served)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            access_log=args.log_level.lower() == "debug", lifespan="off",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    ready = f"dsaserve ready on http://{args.host}:{args.port} (model {served})"
    server = _Server(config, ready, lambda: loop.call_soon_threadsafe(frontend.begin_shutdown))
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn could not bind the port
        return int(exc.code or 1)
    finally:
        if bootstrap is not None:
            bootstrap.close()
    return 0


async def _stop(frontend: Frontend, procs: list[BaseProcess]) -> None:
    try:
        await asyncio.shield(frontend.close())  # the leaders; their followers stop in the same step
    finally:  # whatever happened, no child may outlive us (a follower stuck in a collective included)
        for proc in procs:
            stop_process(proc)
