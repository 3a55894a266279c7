"""A call refused with an error (one prompt of a batch, or one of n, rejected by its leader) is no finished generation
of /metrics: the parts the leader had accepted are aborted, and neither they nor their tokens count.

The leader is a stand-in: the test sends its events to the frontend in the order a real leader sends them
(Accepted and Rejected before the outputs of the step that follows)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest

from dsaserve.engine.request import FinishReason, RequestOutput, SamplingParams
from dsaserve.server import messages as m
from dsaserve.server.errors import ApiError
from dsaserve.server.frontend import Frontend
from dsaserve.server.handles import Delta
from dsaserve.server.metrics import ServerMetrics

LINK = SimpleNamespace(rank=0)


class OneLeaderFrontend(Frontend):
    """The frontend's request bookkeeping without rank processes: what it sends a leader is recorded."""

    def __init__(self) -> None:  # noqa: D107 - (the real one binds sockets and starts ranks)
        self.metrics, self.handles, self.groups = ServerMetrics(), {}, {}
        self.links, self.tokenizer, self.down, self.shutting_down = [LINK], None, None, False
        self.request_log = None  # (--log-requests off)
        self._rr = iter(range(1 << 30))
        self.sent: list[Any] = []

    def _send(self, rank: int, command: m.Command) -> None:
        self.sent.append(command)


def _samples(metrics: ServerMetrics) -> dict[str, float]:
    lines = generate_latest(metrics.registry).decode().splitlines()
    return {k: float(v) for k, v in (x.rsplit(" ", 1) for x in lines if x and not x.startswith("#"))}


async def _call(fe: OneLeaderFrontend, refused: bool) -> None:
    """A call of two prompts: the second is rejected (`refused`) or accepted; the first yields a token and ends."""
    job = asyncio.ensure_future(fe.submit_many([[5, 6], [7]], [SamplingParams(), SamplingParams()], "call", None))
    while len([c for c in fe.sent if isinstance(c, m.AddRequest)]) < 2:
        if job.done():  # it failed before sending both (raises here rather than waiting for ever)
            job.result()
        await asyncio.sleep(0)
    fe._dispatch(LINK, m.Accepted("call-0"), None)
    fe._dispatch(LINK, m.Rejected("call-1", "token id 99999 is outside the vocabulary", 400) if refused else
                 m.Accepted("call-1"), None)
    fe._dispatch(LINK, RequestOutput("call-0", [9], [], 2, 1), Delta("x", [9], prompt_tokens=2, completion_tokens=1))
    if refused:
        with pytest.raises(ApiError) as err:
            await job
        assert err.value.status == 400 and m.AbortRequest("call-0", "another prompt of the same call was rejected") \
            in fe.sent
    else:
        await job
    finish = FinishReason("abort" if refused else "length")
    fe._dispatch(LINK, RequestOutput("call-0", [], [], 2, 1, finish=finish),
                 Delta(finish=finish, prompt_tokens=2, completion_tokens=1))


def test_the_accepted_parts_of_a_refused_call_are_not_counted() -> None:
    fe = OneLeaderFrontend()
    asyncio.run(_call(fe, refused=True))
    got = _samples(fe.metrics)
    assert not fe.handles and not fe.groups
    assert not any(k.startswith("dsaserve_requests_total") for k in got), got
    assert got["dsaserve_generation_tokens_total"] == 0 and got["dsaserve_prompt_tokens_total"] == 0
    assert got["dsaserve_time_to_first_token_seconds_count"] == 0
    assert got["dsaserve_e2e_request_latency_seconds_count"] == 0


def test_the_parts_of_an_accepted_call_are_counted() -> None:
    fe = OneLeaderFrontend()
    asyncio.run(_call(fe, refused=False))
    got = _samples(fe.metrics)
    assert got['dsaserve_requests_total{finish_reason="length"}'] == 1
    assert got["dsaserve_generation_tokens_total"] == 1 and got["dsaserve_prompt_tokens_total"] == 2
