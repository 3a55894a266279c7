"""Request and process lifecycle: disconnects and aborts free pages, a dead engine process fails its
requests and /health, SIGTERM under load ends every stream and leaves no process behind."""
from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from server_process import ServerProcess, module_server, descendants, is_running

pytestmark = pytest.mark.timeout(180)
FLAGS = dict(page_size=4, max_total_tokens=4096)
LONG = {"max_tokens": 3000, "temperature": 0, "ignore_eos": True}  # minutes of decoding if never aborted
CLIENT_LONG = {"max_tokens": 3000, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_ds: str, tmp_path_factory: pytest.TempPathFactory):
    yield from module_server(tiny_ds, tmp_path_factory, own_group=True, **FLAGS)


def wait_idle(server: ServerProcess, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = server.server_info()["internal_states"][0]
        if state["free_pages"] == state["total_pages"] and state["running"] == state["waiting"] == 0:
            return state
        assert time.monotonic() < deadline, f"pages not freed: {state}"
        time.sleep(0.1)


def test_http_runs_on_httptools_and_uvloop(server: ServerProcess) -> None:
    """Both are dependencies: the server must pick them up (it builds its own event loop)."""
    assert "HTTP: HttpToolsProtocol on the uvloop event loop" in server.log()


def test_an_http2_probe_is_closed_without_a_warning(server: ServerProcess) -> None:
    """sglang-router probes workers for gRPC (HTTP/2's preface): the connection closes unanswered, no
    "Invalid HTTP request" WARNING per probe, and a bad HTTP/1.1 request still gets its 400."""
    import socket
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # + an empty SETTINGS
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(preface)
        assert sock.recv(1024) == b""  # closed, nothing written
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    deadline = time.monotonic() + 5
    while server.log().count("Invalid HTTP request received") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.log().count("Invalid HTTP request received") == 1  # the bad request's, not the probe's


def test_idle_connection_outlives_client_keep_alive(server: ServerProcess) -> None:
    """A connection idle past the 5 s that httpx / the openai SDK keep theirs (uvicorn's default timeout too)
    still takes a request: no reset for a client that reuses it just then."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        sock = conn.sock
        time.sleep(6.0)
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        assert response.status == 200 and conn.sock is sock, "the idle connection was closed"
    finally:
        conn.close()


def assert_gone(pids: list[int], timeout: float = 5.0) -> None:
    """Children exit with or right after the server (the resource tracker on its pipe's EOF)."""
    deadline = time.monotonic() + timeout
    while any(is_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:120]) for pid in pids if is_running(pid)]
    assert not left, f"processes left behind: {left}"


def test_stream_disconnect_frees_pages(server: ServerProcess, model: str) -> None:
    wait_idle(server)
    body = {"model": model, "prompt": [5] * 40, "stream": True, **LONG}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: ")) >= 3
        busy = server.server_info()["internal_states"][0]
        assert busy["running"] == 1 and busy["free_pages"] < busy["total_pages"]
    wait_idle(server)  # the connection closed mid-stream: the request was aborted


def test_non_stream_disconnect_frees_pages(server: ServerProcess, model: str) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", timeout=httpx.Timeout(30, read=1.0),
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}], **LONG})
    wait_idle(server)


def test_abort_request(server: ServerProcess) -> None:
    body = {"input_ids": [5, 6, 7], "rid": "abort-me", "stream": True,
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True, "temperature": 0}}
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=30) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    ok = httpx.post(f"{server.url}/abort_request", json={"rid": "abort-me"}, timeout=10)
                    assert ok.status_code == 200
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert httpx.post(f"{server.url}/abort_request", json={"rid": "abort-me"}, timeout=10).status_code == 404
    wait_idle(server)


def test_bench_counts_an_aborted_stream_as_failed(server: ServerProcess) -> None:
    """`bench serving` reads each stream's finish reason: one that ends with `abort` is a failed request (it counted
    as a success, its few tokens in the totals)."""
    import asyncio

    from dsaserve.bench.serving import _one

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            run = asyncio.create_task(_one(client, "default", [5, 6, 7], 3000, {"rid": "bench-abort"}))
            for _ in range(200):  # until the request runs (then it has thousands of tokens to go)
                if (await client.post("/abort_request", json={"rid": "bench-abort"})).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            return await run
    result = asyncio.run(go())
    assert not result.ok and "finish_reason 'abort'" in result.error, result
    wait_idle(server)


def test_sigterm_under_load_ends_streams_and_leaves_no_process(server: ServerProcess, model: str) -> None:
    """SIGTERM to the server's whole process group, as systemd and `kill -- -PGID` send it: the streams end
    with `abort` (the ranks died of it at once, and the streams ended with a 503 naming a rank)."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    finishes: list[str] = []
    started = threading.Semaphore(0)

    def load(i: int) -> None:
        stream = client.completions.create(model=model, prompt=[5 + i] * 8, stream=True, **CLIENT_LONG)
        started.release()
        last = None
        try:
            for ch in stream:
                last = ch.choices[0].finish_reason or last
        except openai.APIError as exc:
            last = f"error: {exc}"
        finishes.append(str(last))

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=30)
    tree = descendants(server.proc.pid)
    assert tree, "the engine process should be a child of the server"
    t0 = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert time.monotonic() - t0 < 10
    for t in threads:
        t.join(10)
    assert finishes == ["abort"] * 8
    assert_gone(tree)


def engine_pid(server: ServerProcess) -> int:
    for pid in descendants(server.proc.pid):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmd:
            return pid
    raise AssertionError("no engine process found")


def test_dead_engine_fails_requests_and_health(tiny_ds: str, model: str, tmp_path: Path) -> None:
    with ServerProcess(tiny_ds, tmp_path / "server.log", **FLAGS) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.completions.create(model=model, prompt=[5, 6], stream=True, **CLIENT_LONG)
        next(iter(stream))
        tree = descendants(server.proc.pid)
        os.kill(engine_pid(server), signal.SIGKILL)
        with pytest.raises(openai.APIError, match="exited"):
            for _ in stream:
                pass
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model=model, prompt=[5, 6], max_tokens=2)
        assert err.value.status_code == 503 and "exited" in err.value.message
        assert server.stop() == 0
    assert_gone(tree)


def test_engine_exits_when_the_server_is_killed(tiny_ds: str, tmp_path: Path) -> None:
    server = ServerProcess(tiny_ds, tmp_path / "server.log", **FLAGS)
    server.start()
    try:
        tree = descendants(server.proc.pid)
        server.proc.kill()  # no chance to clean up: the engine must notice its parent is gone
        server.proc.wait(10)
        assert_gone(tree, timeout=10)
    finally:
        server.stop()


def test_startup_failure_is_reported(tmp_path: Path) -> None:
    server = ServerProcess(str(tmp_path / "no-such-model"), tmp_path / "server.log", **FLAGS)
    with pytest.raises(RuntimeError, match="exited with code 2") as err:  # checked before any rank starts
        server.start()
    assert "error: no config.json in" in str(err.value) and "no-such-model" in str(err.value)
    assert "Traceback" not in str(err.value)

