"""Start a real `dsaserve serve` process on a free loopback port (tests, benchmarks, examples)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from dsaserve.parallel.nodes import free_port  # noqa: F401 - tests import it from here

READY_PREFIX = "dsaserve ready on "


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listening_addresses(pid: int) -> list[str]:
    """'host:port' of every TCP socket the process listens on (Linux /proc/net/tcp and tcp6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # state LISTEN, owned by this process
                found.append(_address(cols[1]))
    return found


def _address(hex_addr: str) -> str:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # four little-endian words
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def is_running(pid: int) -> bool:
    """True for a live process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ServerProcess:
    """`with ServerProcess(model_path, page_size=4) as srv: srv.url ...`; output goes to a log file."""

    def __init__(self, model_path: str, log_path: str | Path, startup_timeout: float = 120.0,
                 env: dict[str, str] | None = None, own_group: bool = False, **flags: object):
        """own_group: the server leads a process group of its own (a test may signal the whole group)."""
        self.own_group = own_group
        self.port = flags.pop("port", None) or free_port()
        self.env = {**os.environ, **(env or {})}
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.cmd = [sys.executable, "-m", "dsaserve", "serve", "--model-path", model_path, "--port", str(self.port)]
        for key, value in flags.items():
            flag = "--" + key.replace("_", "-")
            self.cmd += [flag] if value is True else [flag, str(value)]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting for it to be ready."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=self.own_group)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if READY_PREFIX in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the server was not ready within {self.startup_timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if line.startswith(READY_PREFIX)]

    def server_info(self, api_key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.get(f"{self.url}/get_server_info", headers=headers, timeout=30).json()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL for the whole tree if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        tree = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in [self.proc.pid, *tree]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return self.proc.wait(timeout)


def module_server(model_path: str, tmp_path_factory: Any, **flags: object) -> Iterator[ServerProcess]:
    """The body of a module-scoped server fixture: one live server for the module, stopped after it."""
    with ServerProcess(model_path, tmp_path_factory.mktemp("srv") / "server.log", **flags) as srv:
        yield srv


@contextlib.contextmanager
def started(*servers: ServerProcess) -> Iterator[tuple[ServerProcess, ...]]:
    """Start the servers side by side (their start-ups overlap), stop every one of them after."""
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
            server.launch()
        for server in servers:
            server.wait_ready()
        yield servers
