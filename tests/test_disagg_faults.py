"""PD: faults at the two servers' boundary end the request they concern, never the engine's step (in a server, an
exception out of the step takes the rank and the whole deployment down). The transfer agent's receiver-side
errors (real NIXL, its calls made to raise once), stray messages on the prefill server's control port (bound on
--host: anyone may connect), and malformed answers from the other server (another version, a bug). A prefill and
a decode engine in one process, stepped in turn."""
from __future__ import annotations

import itertools
import json
import time
from typing import Any, Callable

import pytest
import zmq

from conftest import prompts_ids
from dsaserve.engine.engine import Engine
from dsaserve.engine.request import DisaggRoute
from dsaserve.server_args import ServerArgs
from test_disagg_engine import assert_pools_whole, pd_pair, run_pd
from test_disagg_waits import GREEDY, step_until

pytestmark = pytest.mark.timeout(300)


def _raising_once(real: Callable[..., Any], error: str) -> Callable[..., Any]:
    """`real`, except that its first call raises (as NIXL raises its own errors)."""
    calls = itertools.count()

    def method(*args: Any) -> Any:
        if next(calls) == 0:
            raise RuntimeError(error)
        return real(*args)
    return method


@pytest.mark.parametrize("call,ends", [("update_notifs", "length"), ("check_remote_xfer_done", "error")])
def test_nixl_errors_on_the_decode_side_end_at_most_their_room(tiny_ds: str, monkeypatch, call: str,
                                                               ends: str) -> None:
    """NIXL progressing its notifications raises: the waiting rooms wait on (their request ends as it would);
    telling one write's arrival raises: that room ends with the error (the write ended at the sender). Either
    left the step, with the room's pages held."""
    with pd_pair(tiny_ds, backend="nixl", page_size=4) as (pre, dec):
        nixl = dec.disagg.transport.nixl
        monkeypatch.setattr(nixl, call, _raising_once(getattr(nixl, call), f"nixlBackendError from {call}"))
        ids = prompts_ids(1, [9], seed=3)[0]
        pre.add_request("p", ids, GREEDY, DisaggRoute(5))
        dec.add_request("d", ids, GREEDY, DisaggRoute(5, f"tcp://127.0.0.1:{pre.disagg.port}"))
        finals = step_until((pre, dec), lambda f: {"p", "d"} <= set(f) and not pre.disagg.out, 60)
        assert finals["d"].finish.kind == ends, finals["d"].finish
        assert ends == "length" or call in finals["d"].finish.message
        assert_pools_whole(pre, dec)


@pytest.mark.parametrize("payload", [b"[1]", b"null", b"7", b'{"kind": "dest", "room": "5"}', b"[" * 200_000])
def test_a_stray_message_on_the_prefill_control_port_is_dropped(tiny_ds: str, payload: bytes) -> None:
    """JSON that is no object naming an integer room (or nests past Python's recursion limit) left the step
    (a string room was dropped by the prefill side's own check, now recv_all's, where every side reads)."""
    with pd_pair(tiny_ds, backend="fake", page_size=4) as (pre, dec):
        stray = zmq.Context.instance().socket(zmq.DEALER)
        stray.setsockopt(zmq.LINGER, 0)
        stray.connect(f"tcp://127.0.0.1:{pre.disagg.port}")
        try:
            stray.send_multipart([payload, b""])
            time.sleep(0.2)
            final, _ = run_pd(pre, dec, prompts_ids(1, [9], seed=3), GREEDY, limit_s=60)
            assert final["r0"].finish.kind == "length" and not pre.disagg.dests  # (nothing of the stray kept)
        finally:
            stray.close()
        assert_pools_whole(pre, dec)


def test_page_ids_with_a_malformed_transport_header_end_their_request(tiny_ds: str, monkeypatch) -> None:
    with pd_pair(tiny_ds, backend="fake", page_size=4, disaggregation_timeout_s=10) as (pre, dec):
        monkeypatch.setattr(dec.disagg.transport, "descriptor", lambda: (["not", "an", "object"], b""))
        ids = prompts_ids(1, [9], seed=3)[0]
        pre.add_request("p", ids, GREEDY, DisaggRoute(6))
        dec.add_request("d", ids, GREEDY, DisaggRoute(6, f"tcp://127.0.0.1:{pre.disagg.port}"))
        finals = step_until((pre, dec), lambda f: {"p", "d"} <= set(f), 30)
        assert finals["p"].finish.kind == "error" and "malformed" in finals["p"].finish.message
        assert finals["d"].finish.kind == "error"
        assert_pools_whole(pre, dec)


@pytest.mark.parametrize("done", [
    {"agent": "", "token": 7},  # no drafts
    {"agent": "", "token": None, "drafts": []},
    {"agent": "", "token": 7, "drafts": [], "logprob": [0.0, 5]},
    {"token": 7, "drafts": []},  # no agent
])
def test_a_malformed_done_ends_its_request(tiny_ds: str, done: dict) -> None:
    """A prefill server's answer to the page ids, malformed: it was read after the room was gone, and the error
    left the step with the request's pages held for good."""
    dec = Engine(ServerArgs(model_path=tiny_ds, max_total_tokens=2048, page_size=4, disaggregation_mode="decode",
                            disaggregation_transfer_backend="fake", disaggregation_timeout_s=10), progress=False)
    prefill = zmq.Context.instance().socket(zmq.ROUTER)  # stands in for the prefill server's control socket
    prefill.setsockopt(zmq.LINGER, 0)
    port = prefill.bind_to_random_port("tcp://127.0.0.1")
    try:
        dec.add_request("d", prompts_ids(1, [9], seed=3)[0], GREEDY, DisaggRoute(5, f"tcp://127.0.0.1:{port}"))
        assert prefill.poll(10_000)
        ident, header, _ = prefill.recv_multipart()
        assert json.loads(header)["kind"] == "dest"
        prefill.send_multipart([ident, json.dumps({"kind": "done", "room": 5, **done}).encode(), b""])
        finals = step_until((dec,), lambda f: "d" in f, 30)
        assert finals["d"].finish.kind == "error" and "malformed" in finals["d"].finish.message
        assert_pools_whole(dec)
    finally:
        prefill.close()
        dec.disagg.close()
