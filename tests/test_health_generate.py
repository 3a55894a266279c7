"""/health_generate answers 503 within its timeout when a DP leader never accepts its request (its loop stuck in a
step while its heartbeat thread still beats): the wait for the leader's Accepted counts against the timeout.

The stuck leader is a stand-in frontend whose submit never returns: a real leader cannot be made to hang in a
step without a fault hook in the engine."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
from fastapi import APIRouter, FastAPI

from dsaserve.server import app as app_mod
from dsaserve.server.errors import install_error_handlers


class StuckFrontend:
    """One DP leader that never answers AddRequest (the real Frontend.submit awaits its Accepted)."""
    problem = None
    links = [SimpleNamespace(rank=0)]

    async def encode(self, text: str) -> list[int]:
        return [1, 2, 3]

    async def submit(self, ids: list[int], params: object, rid: str, rank: int) -> None:
        await asyncio.get_running_loop().create_future()  # Accepted never comes

    def abort_handles(self, handles: list, message: str) -> int:
        return len(handles)


def test_health_generate_times_out_when_a_leader_never_accepts(monkeypatch) -> None:
    monkeypatch.setattr(app_mod, "HEALTH_GENERATE_TIMEOUT_S", 0.5)
    app = FastAPI()
    install_error_handlers(app)
    router = APIRouter()
    app_mod._health_routes(router, StuckFrontend(), None)  # type: ignore[arg-type]
    app.include_router(router)

    async def go() -> int | str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            try:
                r = await asyncio.wait_for(client.get("/health_generate"), 5)
            except asyncio.TimeoutError:
                return "no answer within 5 s (the health check's timeout is 0.5 s)"
            return r.status_code
    assert asyncio.run(go()) == 503
