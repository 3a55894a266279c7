"""PD disaggregation: what a server keeps per peer stays bounded when the other side restarts. A decode server
keeps a ZMQ control socket per prefill leader address and a prefill server a NIXL remote agent per decode leader;
a restarted peer comes back under a new address or agent, so the old one must go once nothing can still need it.
Engines in one process (real ZMQ sockets on loopback, real NIXL agents where named), their deadlines on a clock
the test moves."""
from __future__ import annotations

import contextlib
import time
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


def test_prefill_removes_the_nixl_agents_of_restarted_decode_servers(
        tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode server restarted comes with a new NIXL agent: the prefill server used to keep every agent it ever
    added (N restarts, N agents with their connections). One it has not written to for a timeout is removed now."""
    now = [0.0]
    ids = prompts_ids(1, [9], seed=13)[0]
    agents: list[str] = []
    with engine(tiny_ds, "prefill", "nixl") as pre:
        monkeypatch.setattr(pre.disagg.deadlines, "clock", lambda: now[0])
        nixl = pre.disagg.transport.nixl
        for _ in range(RESTARTS):
            with engine(tiny_ds, "decode", "nixl") as dec:  # (re)started: a new agent
                final, _ = run_pd(pre, dec, [ids], GREEDY)
                assert final["r0"].finish.kind == "length", final["r0"].finish
                agents.append(dec.disagg.transport.agent)
            known = [a for a in agents if nixl.check_remote_metadata(a)]
            assert known == agents[-1:], f"the prefill server's NIXL still knows {len(known)} decode agents"
            now[0] += TIMEOUT_S + 1  # nothing written to that server for a timeout
        pre.step()
        assert not any(nixl.check_remote_metadata(a) for a in agents)
        assert not pre.disagg.transport.remote_agents()
        assert_pools_whole(pre)


def test_prefill_keeps_the_nixl_agent_of_a_write_not_ended(tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent is removed (which disconnects it) only once no write to it can still run: not during a write, nor
    while a write given up on (past its time and not cancellable) still runs in NIXL."""
    now = [0.0]
    ids = prompts_ids(1, [9], seed=14)[0]
    with engine(tiny_ds, "prefill", "nixl") as pre, engine(tiny_ds, "decode", "nixl") as dec:
        side, transport = pre.disagg, pre.disagg.transport
        monkeypatch.setattr(side.deadlines, "clock", lambda: now[0])
        monkeypatch.setattr(transport, "poll", lambda handle: False)  # the write never seems to end ...
        monkeypatch.setattr(transport, "cancel", lambda handle: False)  # ... nor to stop
        pre.add_request("p", ids, GREEDY, DisaggRoute(41))
        dec.add_request("d", ids, GREEDY, DisaggRoute(41, f"tcp://127.0.0.1:{side.port}"))
        step_until((pre, dec), lambda f: 41 in side.out and side.out[41].handle is not None, 30)
        agent = dec.disagg.transport.agent
        now[0] = TIMEOUT_S + 1  # past the write's time: drained for one more window
        pre.step()
        assert side.out[41].draining is not None and transport.nixl.check_remote_metadata(agent)
        now[0] = 2 * TIMEOUT_S + 2  # past the drain: given up on, and still running as far as NIXL says
        real_state = transport.nixl.check_xfer_state
        monkeypatch.setattr(transport.nixl, "check_xfer_state", lambda handle: "PROC")
        finals = step_until((pre,), lambda f: "p" in f, 15)
        assert finals["p"].finish.kind == "error" and 41 not in side.out
        now[0] = 4 * TIMEOUT_S  # idle long enough, but a write to it may still land
        pre.step()
        assert transport.nixl.check_remote_metadata(agent)
        monkeypatch.setattr(transport.nixl, "check_xfer_state", real_state)  # it ends: released, then removed
        deadline = time.monotonic() + 15
        while transport.nixl.check_remote_metadata(agent) and time.monotonic() < deadline:
            dec.disagg.transport.progress()  # UCX over TCP needs the receiver's progress (its room is over: none)
            pre.step()
            time.sleep(0.005)
        assert not transport.nixl.check_remote_metadata(agent) and not transport.remote_agents()
        assert_pools_whole(pre)


def test_prefill_removes_the_nixl_agent_of_a_write_that_failed_to_start(
        tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails after its receiver was added (NIXL refuses the descriptors) leaves the agent added too:
    it goes as an idle one does."""
    now = [0.0]
    with engine(tiny_ds, "prefill", "nixl") as pre, engine(tiny_ds, "decode", "nixl") as dec:
        monkeypatch.setattr(pre.disagg.deadlines, "clock", lambda: now[0])
        header, blob = dec.disagg.transport.descriptor()
        bad = dict(header, bases=[b + (1 << 40) for b in header["bases"]])  # memory the decode agent never registered
        monkeypatch.setattr(dec.disagg.transport, "descriptor", lambda: (bad, blob))
        final, _ = run_pd(pre, dec, prompts_ids(1, [9], seed=15), GREEDY)
        assert final["r0"].finish.kind == "error" and "NIXL" in final["r0"].finish.message, final["r0"].finish
        agent = dec.disagg.transport.agent
        assert pre.disagg.transport.nixl.check_remote_metadata(agent)
        now[0] = TIMEOUT_S + 1
        pre.step()
        assert not pre.disagg.transport.nixl.check_remote_metadata(agent)
        assert_pools_whole(pre, dec)


def test_prefill_removes_the_agent_of_a_write_its_idle_receiver_never_takes(
        tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write runs until its receiver progresses, which a decode server that stopped stepping never does (real
    NIXL, nothing patched but the clock). Past its time it is polled one more window (NIXL cannot stop it), then
    given up on; its agent stays while it runs, and goes two timeouts after it was given up on, running or not
    (it was kept for ever)."""
    now = [0.0]
    ids = prompts_ids(1, [9], seed=16)[0]
    with engine(tiny_ds, "prefill", "nixl") as pre, engine(tiny_ds, "decode", "nixl") as dec:
        side, nixl = pre.disagg, pre.disagg.transport.nixl
        monkeypatch.setattr(side.deadlines, "clock", lambda: now[0])
        pre.add_request("p", ids, GREEDY, DisaggRoute(42))
        dec.add_request("d", ids, GREEDY, DisaggRoute(42, f"tcp://127.0.0.1:{side.port}"))  # its page ids go out
        step_until((pre,), lambda f: 42 in side.out and side.out[42].handle is not None, 30)  # (dec: never again)
        agent = dec.disagg.transport.agent
        now[0] = TIMEOUT_S / 4 + 1  # past the write's time
        pre.step()
        assert 42 in side.out and side.out[42].draining is not None, "a write NIXL cannot stop was taken as stopped"
        now[0] = 2 * TIMEOUT_S  # past the drain: given up on
        finals = step_until((pre,), lambda f: "p" in f, 15)
        assert finals["p"].finish.kind == "error" and 42 not in side.out
        given_up = now[0]
        now[0] = given_up + TIMEOUT_S + 1  # idle a timeout, but the write still runs
        pre.step()
        assert nixl.check_remote_metadata(agent) and agent in side.receivers
        now[0] = given_up + 2 * TIMEOUT_S  # it still runs: removed all the same
        pre.step()
        assert not nixl.check_remote_metadata(agent) and not side.transport.remote_agents() and not side.receivers
        assert_pools_whole(pre)
