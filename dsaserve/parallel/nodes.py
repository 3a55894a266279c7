"""Which ranks run on this node, and loopback ports for them: facts the server's front process needs before it
starts its ranks, kept free of torch so that process starts in a fraction of a second."""
from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import time
from collections.abc import Collection
from pathlib import Path

from dsaserve.server_args import ServerArgs


# Where successive free_port calls of this process look next (a random start per process): not engine state,
# only which free port is tried first.
_NEXT_PORT = itertools.count(random.Random(os.getpid() ^ time.time_ns()).randrange(1 << 16))


def free_port(avoid: Collection[int] = ()) -> int:
    """A loopback port that binds now, below the kernel's ephemeral range: a port the kernel hands out for a
    bind to port 0 (another process's sockets, an outgoing connection) could be taken between this check and
    its user's bind ("Address already in use"), one below that range cannot. Successive calls step through
    the range, so ports handed out together by one process differ; `avoid`: ports the caller will bind
    later (free now, so the check alone would not skip them)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    span = min(8192, low - 1024)
    for _ in range(max(span, 0)):
        port = low - 1 - next(_NEXT_PORT) % span
        if port in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket() as s:  # no range known (not Linux) or all taken: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_on_this_node(args: ServerArgs) -> range:
    if args.tp % args.nnodes:
        raise ValueError(f"--tp ({args.tp}) must be divisible by --nnodes ({args.nnodes})")
    per_node = args.tp // args.nnodes
    return range(args.node_rank * per_node, (args.node_rank + 1) * per_node)


def describe_exit(code: int | None) -> str:
    """A process's exit code in words: "code 3", "killed by SIGKILL"."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"code {code}"
