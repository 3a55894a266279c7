"""A call's parts (n > 1 or a batch: ids base-0, base-1, ...) and another client's request that runs under one of
those ids once that part ended (a client's own rid may reuse it): aborting, refusing or counting the call touches
its own parts only, and the call's id is free again once its parts ended. The frontend's bookkeeping with the
leader stand-in of test_metrics_refused (events in the order a real leader sends them)."""
from __future__ import annotations

import asyncio

import pytest

from dsaserve.engine.request import FinishReason, RequestOutput, SamplingParams
from dsaserve.server import messages as m
from dsaserve.server.errors import ApiError
from dsaserve.server.handles import Delta
from test_metrics_refused import LINK, OneLeaderFrontend, _samples

TWO = [[5, 6], [7, 8]]


async def _sent(fe: OneLeaderFrontend, rids: list[str]) -> None:
    """Until the frontend sent these requests to the leader (bounded: a job that failed raises in the test)."""
    for _ in range(1000):
        if all(any(isinstance(c, m.AddRequest) and c.rid == r for c in fe.sent) for r in rids):
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never sent {rids}")


async def _accept(fe: OneLeaderFrontend, job: asyncio.Future, rids: list[str]) -> object:
    await _sent(fe, rids)
    fe.sent = [c for c in fe.sent if not isinstance(c, m.AddRequest)]  # (a later request may reuse these ids)
    for rid in rids:
        fe._dispatch(LINK, m.Accepted(rid), None)
    return await asyncio.wait_for(job, 10)


def _finish(fe: OneLeaderFrontend, rid: str, kind: str = "length") -> None:
    finish = FinishReason(kind)
    fe._dispatch(LINK, RequestOutput(rid, [9], [], 2, 1, finish=finish),
                 Delta("x", [9], finish=finish, prompt_tokens=2, completion_tokens=1))


def _aborted(fe: OneLeaderFrontend) -> list[str]:
    return [c.rid for c in fe.sent if isinstance(c, m.AbortRequest)]


def test_a_calls_abort_leaves_a_request_that_took_an_ended_parts_id_alone() -> None:
    async def run() -> None:
        fe = OneLeaderFrontend()
        await _accept(fe, asyncio.ensure_future(fe.submit_many(TWO, [SamplingParams()] * 2, "x", None)),
                      ["x-0", "x-1"])
        _finish(fe, "x-0")
        await _accept(fe, asyncio.ensure_future(fe.submit([1, 2], SamplingParams(), "x-0", None)), ["x-0"])
        fe.sent.clear()
        assert fe.abort("x", "aborted by /abort_request") and _aborted(fe) == ["x-1"]
        _finish(fe, "x-1", "abort")
        assert fe.groups == {}  # the call's id is free again (it stayed taken while x-0 ran)
        _finish(fe, "x-0")
        assert fe.handles == {}
    asyncio.run(run())


def test_a_call_with_a_part_id_in_use_is_refused_before_it_starts() -> None:
    """Its parts went to the leader, the taken one was refused and the call's refusal uncounted the other client's
    request (its tokens and finish never reached /metrics)."""
    async def run() -> None:
        fe = OneLeaderFrontend()
        other = await _accept(fe, asyncio.ensure_future(fe.submit([1, 2], SamplingParams(), "x-1", None)), ["x-1"])
        fe.sent.clear()
        with pytest.raises(ApiError, match="request id 'x-1' is already in use") as err:
            await asyncio.wait_for(fe.submit_many(TWO, [SamplingParams()] * 2, "x", None), 10)
        assert err.value.status == 400 and fe.sent == [] and fe.groups == {} and other.counted
        _finish(fe, "x-1")
        assert _samples(fe.metrics)['dsaserve_requests_total{finish_reason="length"}'] == 1
    asyncio.run(run())


def test_a_refused_calls_rollback_leaves_a_request_that_took_an_ended_parts_id_alone() -> None:
    """x-0 accepted and ended at once, another client's request took its id, then x-1 was refused: the call's
    rollback aborted and uncounted that request by the id."""
    async def run() -> None:
        fe = OneLeaderFrontend()
        call = asyncio.ensure_future(fe.submit_many(TWO, [SamplingParams()] * 2, "x", None))
        await _sent(fe, ["x-0", "x-1"])
        fe.sent.clear()
        fe._dispatch(LINK, m.Accepted("x-0"), None)
        _finish(fe, "x-0")
        other = await _accept(fe, asyncio.ensure_future(fe.submit([1, 2], SamplingParams(), "x-0", None)), ["x-0"])
        fe.sent.clear()
        fe._dispatch(LINK, m.Rejected("x-1", "the queue is full", 503), None)
        with pytest.raises(ApiError, match="queue is full"):
            await asyncio.wait_for(call, 10)
        assert _aborted(fe) == [] and other.counted and fe.groups == {}
    asyncio.run(run())


def test_a_call_whose_client_left_before_every_part_was_accepted_aborts_them_all() -> None:
    """The parts accepted already ran to their end (the route, cancelled, never got their handles to abort)."""
    async def run() -> None:
        fe = OneLeaderFrontend()
        call = asyncio.ensure_future(fe.submit_many(TWO, [SamplingParams()] * 2, "x", None))
        await _sent(fe, ["x-0", "x-1"])
        fe._dispatch(LINK, m.Accepted("x-0"), None)
        await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert sorted(_aborted(fe)) == ["x-0", "x-1"]
    asyncio.run(run())


def test_a_leader_whose_events_are_read_no_more_fails_the_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task reading a leader's events ends on an error past its handlers (a Rust panic in the tokenizer is a
    BaseException, stood in for here): that leader's requests waited for ever and new ones were taken. Now the
    deployment fails as when a rank dies: its requests end with the reason and new ones get 503. Real ZMQ."""
    import concurrent.futures
    from types import SimpleNamespace

    import zmq
    import zmq.asyncio

    from dsaserve.server import frontend as frontend_module

    class Panic(BaseException):
        pass

    def panicking(outputs: list) -> list:
        raise Panic("tokenizer panicked")
    monkeypatch.setattr(frontend_module, "detokenize_outputs", panicking)

    async def run() -> None:
        ctx = zmq.asyncio.Context()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind("inproc://leader-0")
        push.connect("inproc://leader-0")
        fe = OneLeaderFrontend()
        fe.links = [SimpleNamespace(rank=0, pull=pull)]
        fe.outbox, fe.ranks = SimpleNamespace(stopped=False), SimpleNamespace(stop=lambda: None)
        fe._detokenize_pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            fe._start_receiving()
            handle = await _accept(fe, asyncio.ensure_future(fe.submit([1, 2], SamplingParams(), "r", None)), ["r"])
            await push.send_pyobj([RequestOutput("r", [9], [], 2, 1)])
            for _ in range(500):
                if fe.down is not None:
                    break
                await asyncio.sleep(0.01)
            assert fe.down is not None and "stopped reading DP rank 0's events: Panic" in fe.down, fe.down
            assert handle.finished and fe.handles == {}
            with pytest.raises(ApiError) as err:
                await fe.submit([1, 2], SamplingParams(), "later", None)
            assert err.value.status == 503
        finally:
            for task in fe._receivers:
                task.cancel()
            fe._detokenize_pool.shutdown()
            pull.close(0)
            push.close(0)
            ctx.term()
    asyncio.run(asyncio.wait_for(run(), 30))
