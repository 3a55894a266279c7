"""PD disaggregation: what a server keeps per peer stays bounded when the other side restarts. A decode server
keeps a ZMQ control socket per prefill leader address and a prefill server a NIXL remote agent per decode leader;
a restarted peer comes back under a new address or agent, so the old one must go once nothing can still need it.
Engines in one process (real ZMQ sockets on loopback, real NIXL agents where named), their deadlines on a clock
the test moves."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import zmq

from conftest import prompts_ids
from dsaserve import SamplingParams
from dsaserve.engine.engine import Engine
from dsaserve.engine.request import DisaggRoute
from dsaserve.server_args import ServerArgs
from test_disagg_engine import assert_pools_whole, run_pd
from test_disagg_waits import step_until

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
TIMEOUT_S = 10.0  # --disaggregation-timeout-s: also how long an idle peer is kept
RESTARTS = 4


@contextlib.contextmanager
def engine(model: str, mode: str, backend: str, **kw: object) -> Iterator[Engine]:
    """One side of a PD pair; its transfer agent and sockets are closed afterwards (as the server does on exit)."""
    e = Engine(ServerArgs(model_path=model, max_total_tokens=512, page_size=4, disaggregation_mode=mode,
                          disaggregation_transfer_backend=backend, disaggregation_timeout_s=TIMEOUT_S, **kw),
               progress=False)
    try:
        yield e
    finally:
        e.disagg.close()


def test_decode_closes_the_sockets_of_restarted_prefill_servers(tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill server restarted binds new control ports: the decode server used to keep a socket to each address
    it ever sent to (N restarts, N sockets). One that no request has needed for a timeout is closed now."""
    now = [0.0]
    ids = prompts_ids(1, [9], seed=11)[0]
    seen: list[zmq.Socket] = []
    with engine(tiny_ds, "decode", "fake") as dec:
        monkeypatch.setattr(dec.disagg.deadlines, "clock", lambda: now[0])
        for _ in range(RESTARTS):
            with engine(tiny_ds, "prefill", "fake") as pre:  # (re)started: a new control port
                final, _ = run_pd(pre, dec, [ids], GREEDY)
                assert final["r0"].finish.kind == "length", final["r0"].finish
            seen += [s for s in dec.disagg.peers.values() if s not in seen]
            assert len(dec.disagg.peers) == 1, f"{len(dec.disagg.peers)} control sockets after a prefill restart"
            now[0] += TIMEOUT_S + 1  # nothing for that server for a timeout
        dec.step()
        assert not dec.disagg.peers and len(seen) == RESTARTS and all(s.closed for s in seen)
        assert_pools_whole(dec)


def test_decode_keeps_the_socket_of_a_prefill_server_a_request_waits_on(
        tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket goes only a timeout after its last request ended: the pages of a request whose cache never came
    are held a second timeout (a write may still land), and its prefill server's answer comes on that socket."""
    now = [0.0]
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # a prefill leader that never answers
    silent.setsockopt(zmq.LINGER, 0)
    peer = f"tcp://127.0.0.1:{silent.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        with engine(tiny_ds, "decode", "fake") as dec:
            monkeypatch.setattr(dec.disagg.deadlines, "clock", lambda: now[0])
            dec.add_request("d", prompts_ids(1, [9], seed=12)[0], GREEDY, DisaggRoute(31, peer))
            step_until((dec,), lambda f: dec.disagg.rooms[31].sent, 15)
            sock = dec.disagg.peers[peer]
            now[0] = TIMEOUT_S + 1  # the request times out; its pages wait one more timeout for an answer
            finals = step_until((dec,), lambda f: "d" in f, 15)
            assert finals["d"].finish.kind == "error" and 31 in dec.disagg.rooms
            now[0] = 2 * TIMEOUT_S + 2  # no answer: the pages are freed
            dec.step()
            assert 31 not in dec.disagg.rooms and dec.disagg.peers.get(peer) is sock and not sock.closed
            now[0] = 3 * TIMEOUT_S + 3  # a timeout after the room went
            dec.step()
            assert peer not in dec.disagg.peers and sock.closed
            assert_pools_whole(dec)
    finally:
        ctx.destroy(linger=0)
