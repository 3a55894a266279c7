"""PD disaggregation: the two servers never wait on each other longer than they must, and never write into
pages the other has given away. A prefill engine and a decode engine in one process (real ZMQ control
sockets, the `fake` transfer backend), stepped in turn; small decode pools make the waits happen."""
from __future__ import annotations

import time

import pytest

from conftest import prompts_ids
from dsaserve import SamplingParams
from dsaserve.engine.engine import Engine
from dsaserve.engine.request import DisaggRoute, FinishReason, QueueFull, RequestError, RequestOutput
from test_disagg_engine import assert_pools_whole, pd_pair, run_pd

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
SMALL = dict(max_total_tokens=128)  # a decode pool that holds one of the prompts below at a time


def two_prompts(dec: Engine, n: int = 2) -> list[list[int]]:
    """Prompts of which the decode pool holds only one at a time."""
    length = 4 * (dec.stats().total_pages // 2 + 1) - 2
    return prompts_ids(n, [length] * n, seed=4)


def step_until(engines: tuple[Engine, ...], done, limit_s: float) -> dict[str, RequestOutput]:
    """Step every engine in turn until `done(finals)`; the final outputs by request id."""
    finals: dict[str, RequestOutput] = {}
    deadline = time.monotonic() + limit_s
    while not done(finals) and time.monotonic() < deadline:
        for e in engines:
            for out in e.step() + e.take_finished():
                if out.finished:
                    finals[out.rid] = out
        time.sleep(0.005)
    return finals


def test_opposite_arrival_orders_do_not_deadlock(tiny_ds: str) -> None:
    """The router posts to both servers at once, so they may see two requests in opposite orders. The prefill
    server prefilled (and held pages for) a request the decode server had no pages for, while the decode server
    held its pool for the other one, which the prefill server could not start: both waited out the timeout.
    Now a prefill starts only once the decode server's pages are there."""
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=20,
                 prefill=SMALL, decode=SMALL) as (pre, dec):
        a, b = two_prompts(dec)
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        pre.add_request("pb", b, GREEDY, DisaggRoute(2))
        pre.add_request("pa", a, GREEDY, DisaggRoute(1))
        dec.add_request("a", a, GREEDY, DisaggRoute(1, peer))
        dec.add_request("b", b, GREEDY, DisaggRoute(2, peer))
        finals = step_until((pre, dec), lambda f: {"a", "b"} <= set(f) and not pre.requests, 15)
        assert {r: finals[r].finish.kind for r in "ab"} == {"a": "length", "b": "length"}, \
            {r: o.finish.message for r, o in finals.items()}
        assert_pools_whole(pre, dec)


def test_decode_never_reuses_pages_under_a_write(tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Page ids that went out late (the pool was full) get the whole timeout from then on: the decode server
    used to count from the request's arrival, free the pages at that deadline and hand them to the next request
    while the prefill server's write (which may start half a timeout after the ids came) was still running."""
    now = [0.0]  # both servers' deadlines run on this clock: 10 ms a round below, whatever the machine's speed
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=2, decode=SMALL) as (pre, dec):
        for side in (pre.disagg, dec.disagg):
            monkeypatch.setattr(side.deadlines, "clock", lambda: now[0])
        a, b, c = two_prompts(dec, 3)
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        monkeypatch.setattr(pre.disagg.transport, "poll", lambda handle: False)  # every write runs to its limit
        dec.add_request("a", a, GREEDY, DisaggRoute(1, peer))  # never prefilled: holds the pool until it times out
        now[0] = 0.4
        pre.add_request("pb", b, GREEDY, DisaggRoute(2))
        dec.add_request("b", b, GREEDY, DisaggRoute(2, peer))  # its page ids go out when "a" gives up
        assert not dec.disagg.rooms[2].sent
        written, reused = None, None
        for _ in range(1000):
            if "pb" not in pre.requests and "c" in dec.requests:
                break
            pre.step()
            finished = [o.rid for o in dec.step() if o.finished]
            o = pre.disagg.out.get(2)
            writing = o is not None and o.handle is not None
            if writing and written is None:
                written = set(o.dest.msg["pages"])
            if "b" in finished and "c" not in dec.requests:
                dec.add_request("c", c, GREEDY, DisaggRoute(3, peer))  # takes whatever pages are free
                reused = written & set(dec.requests["c"].pages) if writing else set()
            now[0] += 0.01
            time.sleep(0.002)  # the control messages' real time
        assert written is not None, "the prefill server never started the write"
        assert reused is not None and not reused, f"pages {sorted(reused or ())} went to a new request mid-write"


def test_a_failed_prefill_step_reaches_the_decode_server(tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill step that fails ends the request there with an error and tells the decode server why (it held
    its pages for the whole timeout, then reported a missing cache)."""
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=20) as (pre, dec):
        ids = prompts_ids(1, [9], seed=3)[0]
        dec.add_request("d", ids, GREEDY, DisaggRoute(5, f"tcp://127.0.0.1:{pre.disagg.port}"))

        def failing_forward(*args: object, **kwargs: object) -> None:
            raise RuntimeError("injected step failure")
        monkeypatch.setattr(pre.runner, "target", failing_forward)
        pre.add_request("p", ids, GREEDY, DisaggRoute(5))
        finals = step_until((pre, dec), lambda f: {"p", "d"} <= set(f), 8)  # well within the timeout
        assert finals["p"].finish.kind == "error"
        assert "d" in finals and "injected step failure" in finals["d"].finish.message
        assert_pools_whole(pre, dec)


def test_decode_abort_before_its_page_ids_went_out_tells_the_prefill_server(tiny_ds: str) -> None:
    """A decode request aborted while it waited for pages still tells the prefill server, which ends its half
    at once (it waited the whole timeout for page ids that could not come)."""
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=20, decode=SMALL) as (pre, dec):
        a, b = two_prompts(dec)
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        dec.add_request("a", a, GREEDY, DisaggRoute(1, peer))  # holds the decode pool
        pre.add_request("pb", b, GREEDY, DisaggRoute(2))
        dec.add_request("b", b, GREEDY, DisaggRoute(2, peer))
        assert not dec.disagg.rooms[2].sent
        assert dec.abort("b")
        finals = step_until((pre, dec), lambda f: "pb" in f, 8)  # well within the 20 s timeout
        assert finals["b"].finish.kind == "abort" and finals["pb"].finish.kind == "abort"
        assert "cancelled" in finals["pb"].finish.message
        assert pre.stats().free_pages == pre.stats().total_pages and not pre.requests


def test_queued_pd_requests_count_in_the_load(tiny_ds: str) -> None:
    """/get_load's num_tokens (EngineStats.queued_tokens) counts what each side queues, as SGLang's does: a decode
    request waiting for pages and a prefill request waiting for the decode server's page ids (they counted 0)."""
    with pd_pair(tiny_ds, backend="fake", page_size=4, decode=SMALL) as (pre, dec):
        a, b = two_prompts(dec)
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        dec.add_request("a", a, GREEDY, DisaggRoute(1, peer))  # holds the decode pool
        pre.add_request("pb", b, GREEDY, DisaggRoute(2))
        dec.add_request("b", b, GREEDY, DisaggRoute(2, peer))
        assert not dec.disagg.rooms[2].sent and 2 in pre.disagg.pending
        assert (dec.stats().waiting, dec.stats().queued_tokens) == (1, len(b))
        assert (pre.stats().waiting, pre.stats().queued_tokens) == (1, len(b))
        assert dec.abort("b") and pre.abort("pb") and dec.abort("a")


def test_malformed_page_ids_end_the_request_not_the_server(tiny_ds: str) -> None:
    """A `dest` message without its page list (a broken or foreign peer) ends its request with a message naming
    the problem; the prefill leader goes on serving (its KeyError escaped the step)."""
    import zmq

    from dsaserve.disagg import protocol as wire
    with pd_pair(tiny_ds, backend="fake", page_size=4) as (pre, dec):
        ids = prompts_ids(1, [9], seed=5)[0]
        header, blob = dec.disagg.transport.descriptor()
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{pre.disagg.port}")
        wire.send(sock, {"kind": "dest", "room": 11, "prompt_len": len(ids), "prompt_crc": wire.prompt_crc(ids),
                         "page_size": 4, "spec_steps": 0, "dtype": str(dec.runner.dtype).removeprefix("torch."),
                         "weights": dec.disagg.weights_id, "transport": header},
                  blob)  # no "pages"
        pre.add_request("p", ids, GREEDY, DisaggRoute(11))
        finals = step_until((pre,), lambda f: "p" in f, 30)
        sock.close()
        ctx.destroy(linger=0)
        assert finals["p"].finish.kind == "error" and "page ids are malformed" in finals["p"].finish.message
        final, tokens = run_pd(pre, dec, [ids], GREEDY)  # and the pair goes on serving
        assert final["r0"].finish.kind == "length" and len(tokens["r0"]) == GREEDY.max_tokens
        assert_pools_whole(pre, dec)


def test_a_second_dest_for_a_room_is_refused_and_the_first_served(tiny_ds: str) -> None:
    """Two decode requests naming one bootstrap room (a router reusing rooms): the second's page ids used to
    replace the first's, so the prefill wrote into the stranger's pages and the first decode request waited out
    its timeout. Now the second gets `failed` at once, its cancel (its client aborted before the refusal came)
    does not end the room, and the first pair completes."""
    import zmq

    from dsaserve.disagg import protocol as wire
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=20) as (pre, dec):
        ids = prompts_ids(1, [9], seed=6)[0]
        dec.add_request("d", ids, GREEDY, DisaggRoute(12, f"tcp://127.0.0.1:{pre.disagg.port}"))
        deadline = time.monotonic() + 10
        while not dec.disagg.rooms[12].sent and time.monotonic() < deadline:
            dec.step()
        while 12 not in pre.disagg.dests and time.monotonic() < deadline:
            pre.step()
            time.sleep(0.005)
        assert 12 in pre.disagg.dests
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{pre.disagg.port}")
        header, blob = dec.disagg.transport.descriptor()
        wire.send(sock, {"kind": "dest", "room": 12, "prompt_len": len(ids), "prompt_crc": wire.prompt_crc(ids),
                         "pages": [0, 1, 2], "skip_pages": 0, "page_size": 4, "spec_steps": 0,
                         "weights": dec.disagg.weights_id, "transport": header}, blob)
        wire.send(sock, {"kind": "cancel", "room": 12, "reason": "aborted by the client"})
        reply = None
        while reply is None and time.monotonic() < deadline:
            pre.step()
            if sock.poll(5):
                reply = sock.recv_multipart()
        sock.close()
        ctx.destroy(linger=0)
        assert reply is not None and b'"failed"' in reply[0] and b"already has a decode request" in reply[0], reply
        pre.add_request("p", ids, GREEDY, DisaggRoute(12))
        finals = step_until((pre, dec), lambda f: {"p", "d"} <= set(f), 15)  # well within the 20 s timeout
        assert finals["d"].finish.kind == "length" and finals["d"].completion_tokens == GREEDY.max_tokens, \
            finals["d"].finish
        assert_pools_whole(pre, dec)


def test_decode_refusal_ends_the_prefill_half_at_once(tiny_ds: str) -> None:
    """A request the decode server refuses (here: too long for its pool) ends the prefill server's half through
    the decode side's `refused`, which the server's frontend calls for every refusal (Frontend.refusing ->
    RefuseRoom; tests/test_disagg_server.py runs that path): the prefill server held the room until its timeout."""
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=20,
                 decode=dict(max_total_tokens=128)) as (pre, dec):
        ids = prompts_ids(1, [200], seed=3)[0]
        route = DisaggRoute(3, f"tcp://127.0.0.1:{pre.disagg.port}")
        pre.add_request("p", ids, GREEDY, DisaggRoute(3))
        with pytest.raises(RequestError) as refusal:
            dec.add_request("d", ids, GREEDY, route)
        dec.disagg.refused(route, str(refusal.value), 400)
        finals = step_until((pre, dec), lambda f: "p" in f, 5)
        assert "p" in finals, "the prefill server still holds the request the decode server refused"
        assert_pools_whole(pre, dec)


def test_prefill_refusal_before_its_side_ends_the_decode_half_at_once(tiny_ds: str) -> None:
    """A prompt too long for the prefill server's pool with max_tokens unset is refused in add_request before the
    prefill side sees the room; its `refused` (the frontend's RefuseRoom) answers the decode server's page ids,
    which were left unanswered for its whole timeout, with the refusal's status."""
    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=20,
                 prefill=dict(max_total_tokens=128)) as (pre, dec):
        ids = prompts_ids(1, [200], seed=3)[0]
        with pytest.raises(RequestError) as refusal:
            pre.add_request("p", ids, params, DisaggRoute(6))
        pre.disagg.refused(DisaggRoute(6), str(refusal.value), 400)
        dec.add_request("d", ids, params, DisaggRoute(6, f"tcp://127.0.0.1:{pre.disagg.port}"))
        finals = step_until((pre, dec), lambda f: "d" in f, 5)
        assert "d" in finals and finals["d"].finish.kind == "error", "the decode server waits for its timeout"
        # the refusal's status and words: not a failed transfer's 500, which a router retries
        assert finals["d"].finish.status == 400
        assert finals["d"].finish.message == f"the prefill server refused it: {refusal.value}"
        assert_pools_whole(pre, dec)


def test_a_prefill_error_reaches_the_decode_half_with_its_status(tiny_ds: str) -> None:
    """A request the prefill server ends with a client's error (a 400: its constraint failed on the first token)
    ends the decode half with that status; an error of the server's own reads as a failed transfer (500), and an
    abort there is an abort here. (All read 500 'KV transfer failed', which sglang-router retries.)"""
    from dsaserve.disagg.decode import prefill_ending
    from dsaserve.disagg.prefill import failed
    message = "the output constraint failed: x"
    with pd_pair(tiny_ds, backend="fake", page_size=4) as (pre, dec):
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        for room, status in ((11, 400), (12, 500)):
            ids = prompts_ids(1, [9], seed=room)[0]
            dec.add_request(f"d{room}", ids, GREEDY, DisaggRoute(room, peer))
            pre.add_request(f"p{room}", ids, GREEDY, DisaggRoute(room))
            pre._finish(pre.requests[f"p{room}"], FinishReason("error", message=message, status=status))
            finish = step_until((pre, dec), lambda f: f"d{room}" in f, 10)[f"d{room}"].finish
            told = f"the prefill server failed it: {message}"
            assert (finish.kind, finish.status) == ("error", status)
            assert finish.message == (told if status == 400 else f"KV transfer from the prefill server failed: {told}")
        assert_pools_whole(pre, dec)
    assert prefill_ending(failed(3, FinishReason("abort", message="m"))) == FinishReason("abort", message="m")
    assert prefill_ending({"message": "m", "status": "400"}).status == 500  # (what is no status is none)
    full = prefill_ending(failed(3, FinishReason("error", message="m", status=503, code="queue_full")))
    assert (full.status, full.code) == (503, "queue_full")
    assert prefill_ending({"message": "m", "status": 503, "code": 7}).code is None


def test_prefill_checks_only_what_it_holds(tiny_ds: str) -> None:
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    with pd_pair(tiny_ds, backend="fake", page_size=4, prefill=dict(max_total_tokens=128),
                 decode=dict(max_total_tokens=2048)) as (pre, dec):
        ids = prompts_ids(1, [20], seed=3)[0]
        final, tokens = run_pd(pre, dec, [ids], params)
        assert final["r0"].finish.kind == "length" and len(tokens["r0"]) == 300


def test_prefill_with_a_longer_timeout_never_writes_into_pages_the_decode_server_gave_up(
        tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two servers' --disaggregation-timeout-s may differ. The prefill server's write window (start within
    half its timeout of the page ids, run a quarter) is safe only against a decode server with the same timeout:
    with a longer one it writes into pages the decode server has freed (and may have handed to another request)."""
    with pd_pair(tiny_ds, backend="fake", page_size=4, prefill=dict(disaggregation_timeout_s=20),
                 decode=dict(disaggregation_timeout_s=2)) as (pre, dec):
        ids = prompts_ids(1, [9], seed=3)[0]
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        monkeypatch.setattr(pre.disagg.transport, "poll", lambda handle: False)  # a slow write
        dec.add_request("d", ids, GREEDY, DisaggRoute(4, peer))
        pre.add_request("p", ids, GREEDY, DisaggRoute(4))
        deadline = time.monotonic() + 15
        while 4 not in pre.disagg.admitted and time.monotonic() < deadline:
            pre.disagg.poll()  # the page ids came
            time.sleep(0.005)
        time.sleep(1.5)  # the prefill server is busy for a while (long prompts ahead of this one)
        while not (4 in pre.disagg.out and pre.disagg.out[4].handle is not None) and "p" in pre.requests \
                and time.monotonic() < deadline:
            pre.step()
        finals: dict[str, RequestOutput] = {}
        while "d" not in finals and time.monotonic() < deadline:
            for out in dec.step():
                if out.finished:
                    finals[out.rid] = out
            time.sleep(0.005)
        assert finals["d"].finish.kind == "error"  # the decode server gave up: its pages are free for others
        pre.step()  # the decode server's cancel arrives
        o = pre.disagg.out.get(4)
        assert o is None or o.handle is None, "a write into the freed pages is still running"


def stuck_writes(monkeypatch: pytest.MonkeyPatch, pre: Engine, dec: Engine, now: list[float],
                 landed: list[bool]) -> None:
    """Both servers' deadlines on the clock `now[0]`, which the test moves; the prefill side's writes land when
    `landed[0]` and cannot be cancelled (as NIXL's posted writes)."""
    for side in (pre.disagg, dec.disagg):
        monkeypatch.setattr(side.deadlines, "clock", lambda: now[0])
    monkeypatch.setattr(pre.disagg.transport, "poll", lambda handle: landed[0])
    monkeypatch.setattr(pre.disagg.transport, "cancel", lambda handle: False)


def test_a_write_that_cannot_be_cancelled_keeps_the_decode_pages_until_it_lands(
        tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write past its time that the transport cannot cancel (NIXL refuses to release an active transfer) may
    still land. The prefill server used to report it failed at once, and the decode server freed the pages under
    it (also at its own timeout). Now the prefill server polls it until it ends (at most a window) and the decode
    server, whose request times out meanwhile, holds those pages until the prefill server answers; the late
    write then ends as failed (the decode request is over) and never resumes a new request of the same id. The
    waits run on a clock the test moves (both servers' deadlines), so nothing depends on the machine's speed."""
    now, landed = [0.0], [False]
    with pd_pair(tiny_ds, backend="fake", page_size=4, prefill=dict(disaggregation_timeout_s=30),
                 decode=dict(disaggregation_timeout_s=4)) as (pre, dec):
        stuck_writes(monkeypatch, pre, dec, now, landed)
        ids, peer = prompts_ids(1, [9], seed=5)[0], f"tcp://127.0.0.1:{pre.disagg.port}"
        pre.add_request("p", ids, GREEDY, DisaggRoute(6))
        dec.add_request("d", ids, GREEDY, DisaggRoute(6, peer))
        total = dec.stats().total_pages
        step_until((pre, dec), lambda f: 6 in pre.disagg.out and pre.disagg.out[6].handle is not None, 15)
        now[0] = 1.1  # past the write's quarter of the 4 s window: its cancel fails, so it is drained
        step_until((pre, dec), lambda f: pre.disagg.out[6].draining is not None, 15)
        now[0] = 4.5  # past the decode server's timeout, within the drain
        finals = step_until((pre, dec), lambda f: "d" in f and pre.disagg.out[6].aborted is not None, 15)
        assert finals["d"].finish.kind == "error" and "within 4 s" in finals["d"].finish.message
        assert 6 in dec.disagg.rooms and dec.stats().free_pages < total, "pages a write could reach were freed"
        dec.add_request("d", ids, GREEDY, DisaggRoute(7, peer))  # a client reusing the request id
        reused = dec.requests["d"]
        landed[0] = True
        finals = step_until((pre, dec), lambda f: "p" in f and 6 not in dec.disagg.rooms, 15)
        assert finals["p"].finish.kind == "abort" and "timed out on the decode server" in finals["p"].finish.message
        assert dec.requests.get("d") is reused and not reused.output_ids, "the late write resumed another request"
        assert dec.abort("d")
        step_until((pre, dec), lambda f: dec.stats().free_pages == total and not dec.disagg.rooms, 15)
        assert_pools_whole(pre, dec)


def test_page_ids_read_late_keep_their_pages_until_the_drained_write_ends(
        tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill side counts its write windows from when it read the page ids, the decode side its two timeouts
    from when it sent them. Ids read 3.9 s late (a stalled prefill leader; both timeouts 4 s) let a write start at
    3.9 s, pass its quarter at 4.9 s and drain until 8.9 s, while the decode server freed the pages at 8 s: the
    write could land in pages another request holds. The prefill side's `draining` keeps them held a timeout from
    when the decode server hears it."""
    now, landed = [0.0], [False]
    with pd_pair(tiny_ds, backend="fake", page_size=4, prefill=dict(disaggregation_timeout_s=4),
                 decode=dict(disaggregation_timeout_s=4)) as (pre, dec):
        stuck_writes(monkeypatch, pre, dec, now, landed)
        ids, peer = prompts_ids(1, [9], seed=6)[0], f"tcp://127.0.0.1:{pre.disagg.port}"
        total = dec.stats().total_pages
        dec.add_request("d", ids, GREEDY, DisaggRoute(8, peer))
        assert dec.disagg.rooms[8].sent
        now[0] = 3.9  # the prefill server reads them only now
        pre.add_request("p", ids, GREEDY, DisaggRoute(8))
        step_until((pre, dec), lambda f: 8 in pre.disagg.out and pre.disagg.out[8].handle is not None, 15)
        now[0] = 4.0
        finals = step_until((pre, dec), lambda f: "d" in f, 15)
        assert finals["d"].finish.kind == "error" and "within 4 s" in finals["d"].finish.message
        now[0] = 5.0  # past the write's quarter: its cancel fails, it drains until 8.9
        step_until((pre, dec), lambda f: pre.disagg.out[8].draining is not None and dec.disagg.rooms[8].hold > 8, 15)
        now[0] = 8.5  # past the decode server's two timeouts from sending, within the drain
        for _ in range(20):
            pre.step(), dec.step()
            time.sleep(0.005)
        assert 8 in dec.disagg.rooms and dec.stats().free_pages < total, "pages a write could reach were freed"
        landed[0] = True
        finals = step_until((pre, dec), lambda f: "p" in f and 8 not in dec.disagg.rooms, 15)
        assert finals["p"].finish.kind == "abort"
        step_until((pre, dec), lambda f: dec.stats().free_pages == total, 15)
        assert_pools_whole(pre, dec)


def test_decode_server_queue_is_bounded(tiny_ds: str) -> None:
    with pd_pair(tiny_ds, backend="fake", page_size=4, decode=dict(max_total_tokens=128, max_queued_requests=2)
                 ) as (pre, dec):
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        ids = prompts_ids(1, [100], seed=3)[0]
        with pytest.raises(QueueFull):
            for i in range(5):
                dec.add_request(f"d{i}", ids, GREEDY, DisaggRoute(20 + i, peer))


def test_pd_arrivals_wait_behind_a_retracted_request(tiny_ds: str) -> None:
    """After a retraction the decode pool is over-committed: the aggregated scheduler admits nothing new until a
    request finishes, and the retracted (earlier) request goes first. Pre-allocation for PD arrivals ignored both:
    a later request took the pages the retracted one waited for (under a steady PD load it never got back in).
    Its usage's cached_tokens stay its first admission's (it counted its own retracted pages)."""
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=60,
                 decode=dict(max_total_tokens=160)) as (pre, dec):
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        a, b, c = prompts_ids(3, [30, 30, 30], seed=13)
        for i, ids in enumerate((a, b)):
            pre.add_request(f"p{i}", ids, params, DisaggRoute(40 + i))
            dec.add_request(f"d{i}", ids, params, DisaggRoute(40 + i, peer))
        deadline = time.monotonic() + 240  # (a bound: about 3 s alone, 40 s on a busy machine)
        while not dec.scheduler.num_retractions and time.monotonic() < deadline:
            pre.step()
            dec.step()
            time.sleep(0.002)
        assert dec.scheduler.num_retractions == 1 and dec.scheduler.waiting
        retracted = dec.scheduler.waiting[0]
        pre.add_request("p2", c, params, DisaggRoute(42))
        dec.add_request("d2", c, params, DisaggRoute(42, peer))
        overtaken, finals = False, {}
        while dec.requests and time.monotonic() < deadline:
            pre.step()
            finals.update((o.rid, o) for o in dec.step() if o.finished)
            if dec.scheduler.waiting and dec.scheduler.waiting[0] is retracted and 42 in dec.disagg.rooms \
                    and dec.disagg.rooms[42].sent:
                overtaken = True
            time.sleep(0.002)
        assert not overtaken, "a later PD arrival took pages while the retracted request waited"
        assert dec.scheduler.num_retractions == 1, dec.scheduler.num_retractions
        # usage: the prompt's cache hit when it was first admitted (none), as the aggregated engine reports it, not
        # the re-admission's match of its own retracted pages
        assert [finals[f"d{i}"].cached_tokens for i in range(3)] == [0, 0, 0]
        assert finals[retracted.rid].completion_tokens == 60


def test_page_ids_for_a_room_a_refusal_ended_are_answered_at_once(tiny_ds: str) -> None:
    """A refusal's cancel (here from decode leader 0, Frontend.refusing's default) ends a room whose prefill
    request waits; page ids for that room from another requester (leader 1, under DP attention) must be answered
    `failed` at once: they sat unclaimed and leader 1 held its pages for its whole timeout."""
    from dsaserve.server_args import ServerArgs
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=20) as (pre, dec0):
        dec1 = Engine(ServerArgs(disaggregation_mode="decode", model_path=tiny_ds, max_total_tokens=2048,
                                 disaggregation_transfer_backend="fake", page_size=4, disaggregation_timeout_s=20),
                      progress=False)
        try:
            peer = f"tcp://127.0.0.1:{pre.disagg.port}"
            ids = prompts_ids(1, [20], seed=3)[0]
            pre.add_request("p", ids, GREEDY, DisaggRoute(5))
            dec0.disagg.refused(DisaggRoute(5, peer), "echo with logprobs ...", 400)  # the worker's RefuseRoom
            step_until((pre,), lambda f: "p" in f, 5)
            dec1.add_request("d", ids, GREEDY, DisaggRoute(5, peer))
            finals = step_until((pre, dec1), lambda f: "d" in f, 5)
            assert "d" in finals, "leader 1 still waits (its pages held) for page ids nobody will answer"
            assert finals["d"].finish.kind == "error" and "refused" in finals["d"].finish.message
            assert_pools_whole(pre, dec1)
        finally:
            dec1.disagg.close()


def test_a_refusal_is_sent_only_for_a_room_no_live_request_holds() -> None:
    """Frontend.refusing's choice: a refused duplicate of a room a live request holds (on any DP leader of this
    server: the leaders do not see each other's rooms) ends nothing; otherwise the routed leader (a prefill
    server's room % dp) or leader 0 tells the other server."""
    from dsaserve.disagg.serving import refusal_leader
    route = DisaggRoute(5, "tcp://127.0.0.1:1")
    assert refusal_leader(route, None, {5, None}, leaders=2) is None  # leader 1's live request holds room 5
    assert refusal_leader(route, None, {6, None}, leaders=2) == 0
    assert refusal_leader(route, 1, set(), leaders=2) == 1
    assert refusal_leader(route, 7, set(), leaders=2) == 0  # (an invalid routed_dp_rank: refused, any leader)
    assert refusal_leader(None, 1, set(), leaders=2) is None  # not a PD request


def test_page_ids_after_the_prefill_half_timed_out_are_answered_at_once(tiny_ds: str) -> None:
    """The decode server's page ids come after the prefill server gave the room up (its pool was busy, or its
    timeout is longer): they are answered `failed` at once, naming the reason, so the decode request ends and
    frees its pages now instead of holding them for its own timeout."""
    with pd_pair(tiny_ds, backend="fake", page_size=4, prefill=dict(disaggregation_timeout_s=1),
                 decode=dict(disaggregation_timeout_s=60)) as (pre, dec):
        ids = prompts_ids(1, [9], seed=5)[0]
        pre.add_request("p", ids, GREEDY, DisaggRoute(6))
        gave_up = step_until((pre,), lambda f: "p" in f, 20)
        assert "no decode server asked" in gave_up["p"].finish.message
        dec.add_request("d", ids, GREEDY, DisaggRoute(6, f"tcp://127.0.0.1:{pre.disagg.port}"))
        finals = step_until((pre, dec), lambda f: "d" in f, 20)  # (a third of the decode server's timeout)
        assert finals["d"].finish.kind == "error" and "no decode server asked" in finals["d"].finish.message
        assert_pools_whole(pre, dec)


def test_pd_arrivals_take_pages_in_arrival_order_and_within_max_running(tiny_ds: str) -> None:
    """A decode server gives pages to PD requests in arrival order, as admission does: a small request that
    fits does not take the pages a larger, earlier one waits for (under a steady load of small ones the large
    one waited out its timeout). And --max-running-requests bounds the running requests with those whose cache
    is on its way (PD requests ran past it), and the statistics count those as transferring."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=60,
                 decode=dict(max_total_tokens=160)) as (pre, dec):
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        first, big, small = prompts_ids(3, [100, 100, 20], seed=17)
        for rid, ids, room in (("first", first, 50), ("big", big, 51), ("small", small, 52)):
            dec.add_request(rid, ids, params, DisaggRoute(room, peer))  # the prefill server has not run yet
            dec.disagg.poll()
        rooms = dec.disagg.rooms
        assert rooms[50].sent and not rooms[51].sent  # the pool holds one long prompt at a time
        assert not rooms[52].sent, "the small request took pages before the earlier one that waits for them"
        stats = dec.stats()  # the first holds pages, its cache on its way: counted (stats showed an idle server)
        assert (stats.running, stats.transferring, stats.waiting) == (0, 1, 2), stats
        order = []
        for rid, ids, room in (("first", first, 50), ("big", big, 51), ("small", small, 52)):
            pre.add_request(rid, ids, params, DisaggRoute(room))
        deadline = time.monotonic() + 120
        finals: dict[str, RequestOutput] = {}
        while len(finals) < 3 and time.monotonic() < deadline:
            pre.step()
            finals.update((o.rid, o) for o in dec.step() if o.finished)
            order += [r for r in (51, 52) if r in rooms and rooms[r].sent and r not in order]
            time.sleep(0.002)
        assert order == [51, 52] and all(finals[r].completion_tokens == 8 for r in ("first", "big", "small"))
        assert_pools_whole(pre, dec)

    with pd_pair(tiny_ds, backend="fake", page_size=4, decode=dict(max_running_requests=2)) as (pre, dec):
        peer, most = f"tcp://127.0.0.1:{pre.disagg.port}", 0
        for i, ids in enumerate(prompts_ids(5, [9, 12, 7, 10, 8], seed=18)):
            pre.add_request(f"p{i}", ids, params, DisaggRoute(60 + i))
            dec.add_request(f"d{i}", ids, params, DisaggRoute(60 + i, peer))
        finals, deadline = {}, time.monotonic() + 120
        while len(finals) < 5 and time.monotonic() < deadline:
            pre.step()
            finals.update((o.rid, o) for o in dec.step() if o.finished)
            most = max(most, len(dec.scheduler.running))
            time.sleep(0.002)
        assert len(finals) == 5 and most == 2, (len(finals), most)
        assert_pools_whole(pre, dec)


def test_page_ids_that_cannot_be_sent_end_their_request_and_return_its_pages(tiny_ds: str, monkeypatch) -> None:
    """A failure between the decode side's giving a request pages and its page ids' going out (the transfer
    agent's descriptor here, or the socket) returns those pages and frees the room: on arrival the request is
    refused, and one that waited for pages ends with the error when they come. Both held pages and room for good.
    The prefill half of the one that waited is told (it held a queue slot until its own timeout; the prefill
    server's clock stands still here, so only the cancel can end it)."""
    with pd_pair(tiny_ds, backend="fake", page_size=4, decode=SMALL) as (pre, dec):
        peer, total = f"tcp://127.0.0.1:{pre.disagg.port}", dec.stats().total_pages
        monkeypatch.setattr(pre.disagg.deadlines, "clock", lambda: 0.0)
        first, second = two_prompts(dec)
        working = dec.disagg.transport.descriptor

        def broken() -> tuple:
            raise RuntimeError("the transfer agent is gone")
        monkeypatch.setattr(dec.disagg.transport, "descriptor", broken)
        with pytest.raises(RuntimeError, match="agent is gone"):
            dec.add_request("refused", first, GREEDY, DisaggRoute(1, peer))
        assert not dec.disagg.rooms and not dec.scheduler.in_transit and dec.stats().free_pages == total
        monkeypatch.setattr(dec.disagg.transport, "descriptor", working)
        pre.add_request("a", first, GREEDY, DisaggRoute(2))
        dec.add_request("a", first, GREEDY, DisaggRoute(2, peer))
        dec.add_request("b", second, GREEDY, DisaggRoute(3, peer))  # waits: the pool holds one prompt
        pre.add_request("b-prefill", second, GREEDY, DisaggRoute(3))
        assert dec.disagg.rooms[2].sent and not dec.disagg.rooms[3].sent
        monkeypatch.setattr(dec.disagg.transport, "descriptor", broken)  # for b's page ids, once a's pages return
        finals = step_until((pre, dec), lambda f: "b" in f and "a" in f and "b-prefill" in f, 120)
        assert finals["a"].finish.kind == "length"
        assert finals["b"].finish.kind == "error" and "agent is gone" in finals["b"].finish.message, finals["b"]
        assert "the decode server cancelled it" in finals["b-prefill"].finish.message, finals["b-prefill"]
        assert not dec.disagg.rooms
        monkeypatch.setattr(dec.disagg.transport, "descriptor", working)
        assert_pools_whole(pre, dec)
