"""The rank processes of one node and the watch over them.

Every rank process beats a heartbeat twice a second (a thread: server.worker) into shared memory.
The supervisor sees a rank that exits at once (its process sentinel wakes the event loop) and a
rank that stops beating (stopped, frozen) within `HUNG_AFTER_S`; it names the rank either way.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import multiprocessing.connection
import os
import time
from typing import Callable

from dsaserve.parallel.nodes import describe_exit, free_port, ranks_on_this_node
from dsaserve.server.messages import SETTING_EXIT, Endpoints
from dsaserve.server.worker import run_rank
from dsaserve.server_args import ServerArgs

HUNG_AFTER_S = 10.0  # no heartbeat for this long: the rank is hung (a busy step still beats)
CHECK_S = 1.0  # how often heartbeats are checked (exits are seen at once)
STOP_GRACE_S = 10.0  # after one rank of a node exits cleanly, how long the others may take


class RankProcesses:
    """This node's rank processes (spawned, not yet started) and their heartbeats."""

    def __init__(self, args: ServerArgs, endpoints: list[Endpoints]):
        # Not a port this server binds later (HTTP, the PD bootstrap server): free now, taken then.
        own = (args.port, args.disaggregation_bootstrap_port)
        init_addr = args.dist_init_addr or f"127.0.0.1:{free_port(avoid=own)}"
        ctx = mp.get_context("spawn")
        self.ranks = list(ranks_on_this_node(args))
        self.attn_tp = args.tp // args.dp
        self.beats = ctx.RawArray("d", len(self.ranks))  # time.monotonic() of each rank's last heartbeat
        self.procs = [ctx.Process(target=run_rank, name=f"dsaserve-rank{r}",
                                  args=(args, r, endpoints, os.getpid(), init_addr, self.beats, i))
                      for i, r in enumerate(self.ranks)]

    def start(self) -> None:
        for proc in self.procs:
            proc.start()

    def name(self, rank: int) -> str:
        return f"rank {rank} (DP group {rank // self.attn_tp})"

    def exited(self) -> list[tuple[int, int]]:
        """(rank, exit code) of every started rank process that has exited (and is reaped)."""
        return [(r, p.exitcode) for r, p in zip(self.ranks, self.procs) if p.pid is not None and p.exitcode is not None]

    def refused_a_setting(self) -> bool:
        """Whether a rank exited refusing a setting (exit 2; its log line says which)."""
        return any(code == SETTING_EXIT for _, code in self.exited())

    def killed(self) -> str | None:
        """The first rank killed by a signal, in words (the usual first cause: others fail after it)."""
        for rank, code in self.exited():
            if code < 0:
                return f"the engine process of {self.name(rank)} exited ({describe_exit(code)})"
        return None

    def hung(self, after: float = HUNG_AFTER_S) -> str | None:
        """The first rank whose heartbeat is older than `after` seconds, in words."""
        now = time.monotonic()
        for rank, beat in zip(self.ranks, self.beats):
            if beat and now - beat > after:
                return (f"the engine process of {self.name(rank)} stopped responding "
                        f"(no heartbeat for {now - beat:.0f} s)")
        return None

    def problem(self, hung_after: float | None = HUNG_AFTER_S) -> str | None:
        """The first rank that exited (killed ones first) or stopped beating, in words; None while all are well."""
        for rank, code in self.exited():
            return self.killed() or f"the engine process of {self.name(rank)} exited ({describe_exit(code)})"
        return self.hung(hung_after) if hung_after is not None else None

    def any_alive(self) -> bool:
        return any(p.pid is not None and p.exitcode is None for p in self.procs)

    def stop(self, timeout: float = 3.0) -> None:
        """Kill every rank still running (ranks ignore SIGTERM: see worker.run_rank; the server told them to
        stop before this), and reap them all: no zombies, no orphans."""
        started = [p for p in self.procs if p.pid is not None]
        for proc in started:
            if proc.exitcode is None:
                proc.kill()
        for proc in started:
            proc.join(timeout)


async def watch(ranks: RankProcesses, on_problem: Callable[[str], None]) -> None:
    """Report the first dead or hung rank to `on_problem`, then return."""
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    sentinels = [p.sentinel for p in ranks.procs]
    for fd in sentinels:
        loop.add_reader(fd, woken.set)
    try:
        while True:
            try:
                await asyncio.wait_for(woken.wait(), CHECK_S)
            except asyncio.TimeoutError:
                pass
            problem = ranks.problem()
            if problem is not None:
                on_problem(problem)
                return
    finally:
        for fd in sentinels:
            loop.remove_reader(fd)


def wait_for_ranks(ranks: RankProcesses, stopping: Callable[[], bool]) -> str | None:
    """A node without the HTTP server: block until its ranks end. None when they all exited cleanly
    (node 0 stopped the deployment); else why they were stopped."""
    clean_since = None
    while True:
        multiprocessing.connection.wait([p.sentinel for p in ranks.procs], timeout=CHECK_S)
        exited = ranks.exited()
        if len(exited) == len(ranks.procs) and all(code == 0 for _, code in exited):
            return None
        bad = [(r, code) for r, code in exited if code != 0]
        if bad:
            return f"the engine process of {ranks.name(bad[0][0])} exited ({describe_exit(bad[0][1])})"
        if stopping():
            return "stopped by a signal"
        if exited and clean_since is None:
            clean_since = time.monotonic()
        if clean_since is not None and time.monotonic() - clean_since > STOP_GRACE_S:
            return "some ranks exited and the others did not follow"
        problem = ranks.hung() if not exited else None
        if problem is not None:
            return problem
