"""A leader's events reach the frontend in the order they happened (server/worker.WorkerLoop).

Under DP attention a leader whose PD transfer or grammar work made progress asks the frontend to wake every
leader (m.Wake) before it steps. It pushed those outputs at once, ahead of the events it had already collected
in the same loop turn: a request added in that turn and ended by its transfer work (a decode server's cancel,
say) reached the frontend as its final output first and its Accepted second; the frontend, done with the request,
dropped the Accepted, and the HTTP handler awaiting it never answered (a PD chaos run: about once in several
hundred aborts). The race needs two servers' timing to meet, so the loop runs here one turn over an engine
stand-in whose transfer poll ends the request it has just been given; the sockets are real ZMQ.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import zmq

from dsaserve.engine.request import FinishReason, RequestOutput, SamplingParams
from dsaserve.server import messages as m
from dsaserve.server.worker import WorkerLoop


class EndsWhatItGets:
    """The WorkerLoop's view of an engine (DP attention, 2 groups): add_request queues a request, the next transfer
    poll ends it with an error (and admits another, so the frontend must wake every leader), step() ends the turn."""

    def __init__(self) -> None:
        self.args = SimpleNamespace(dp=2)
        self.last_sync = SimpleNamespace(any_work=False, any_stop=False, epoch=0)
        self.disagg, self.steps, self.loop = None, 0, None
        self._read_fd, self._write_fd = os.pipe()
        self.grammars = SimpleNamespace(wake_fd=self._read_fd)
        self.added: list[str] = []
        self.working = False

    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams, route: object = None) -> None:
        self.added.append(rid)

    def has_work(self, compiling: bool = True) -> bool:
        return self.working

    def admit_compiled(self) -> list[RequestOutput]:
        return []

    def poll_transfers(self) -> list[RequestOutput]:
        ended, self.added = self.added, []
        self.working = bool(ended)  # another request admitted: a woken leader
        return [RequestOutput(rid, [], [], 3, 0, finish=FinishReason("error", message="the decode server cancelled it"))
                for rid in ended]

    def step(self, epoch: int = 0) -> list[m.Event]:
        self.loop.stopping = True
        return []

    def activity(self) -> tuple[int, ...]:
        return (0,)

    def stats(self) -> None:  # (the loop pushes the engine's statistics: none here)
        return None

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


def test_a_requests_accepted_reaches_the_frontend_before_its_end() -> None:
    ctx = zmq.Context.instance()
    to_leader, leader_in = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    leader_out, to_frontend = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    leader_in.bind("inproc://worker-order-in")
    to_leader.connect("inproc://worker-order-in")
    to_frontend.bind("inproc://worker-order-out")
    leader_out.connect("inproc://worker-order-out")
    engine = EndsWhatItGets()
    try:
        loop = WorkerLoop(engine, leader_in, leader_out)
        engine.loop = loop
        to_leader.send_pyobj(m.Envelope(1, [m.AddRequest("r", [5, 6, 7], SamplingParams())]))
        loop.run()  # one turn: receive, transfer work (ends "r", wakes the leaders), step
        events = []
        while to_frontend.poll(200):
            events += to_frontend.recv_pyobj()
    finally:
        engine.close()
        for sock in (to_leader, leader_in, leader_out, to_frontend):
            sock.close(linger=0)
    about_r = [type(ev).__name__ for ev in events if getattr(ev, "rid", None) == "r"]
    assert about_r == ["Accepted", "RequestOutput"], events
    assert any(isinstance(ev, m.Wake) for ev in events)
