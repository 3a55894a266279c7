"""Start the real sglang-router (through `dsaserve router`) on loopback, in front of live dsaserve servers."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from server_process import ServerProcess, free_port


class RouterProcess:
    """`with RouterProcess(log, "--pd-disaggregation", "--prefill", url, port, "--decode", url) as r: r.url`"""

    def __init__(self, log_path: str | Path, *router_args: str, startup_timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.cmd = [sys.executable, "-m", "dsaserve", "router", *router_args, "--host", "127.0.0.1",
                    "--port", str(self.port), "--prometheus-port", str(free_port()), "--policy", "round_robin",
                    "--log-level", "warn"]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RouterProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:  # ready: it answers a generation (its workers were found healthy)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the router exited with code {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                r = httpx.post(f"{self.url}/generate", timeout=30,
                               json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}})
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"the router was not ready within {self.startup_timeout} s:\n{self.log()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def pd_router(log_path: str | Path, prefill: ServerProcess, bootstrap_port: int, decode: ServerProcess,
              *extra: str) -> RouterProcess:
    return RouterProcess(log_path, "--pd-disaggregation", "--prefill", prefill.url, str(bootstrap_port),
                         "--decode", decode.url, *extra)
