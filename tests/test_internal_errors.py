"""A bug in a request handler is answered as an OpenAI-shaped 500 and the client's keep-alive connection stays
open (Starlette's handler for Exception answered, then re-raised, and uvicorn closed the connection: the next
request a client sent on it failed). A real uvicorn server on loopback, with the server's error handling."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from dsaserve.parallel.nodes import free_port
from dsaserve.server.errors import install_error_handlers

pytestmark = pytest.mark.timeout(60)


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug")

    @app.get("/port")
    async def port(request: Request) -> dict:  # the client's port: which connection the request came on
        return {"port": request.client.port}

    return app


@pytest.fixture(scope="module")
def url():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_a_bug_is_a_json_500_and_the_connection_serves_on(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        before = client.get("/port").json()["port"]
        r = client.get("/boom")
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError: a bug", r.text
        assert r.json()["error"]["type"] == "internal_error"
        after = client.get("/port")
        assert after.status_code == 200 and after.json()["port"] == before  # the same connection
