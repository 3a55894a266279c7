"""The frontend's commands to the DP leaders. Sends never block: commands collect per leader and go out once per
event-loop turn as one envelope per leader (see server.messages)."""
from __future__ import annotations

import asyncio
from typing import Callable

import zmq

from dsaserve.server import messages as m


class Outbox:
    def __init__(self, pushes: list[zmq.Socket], unreachable: Callable[[int], None]):
        """`pushes`: each leader's socket, by DP rank; `unreachable(rank)`: a send found that leader gone."""
        self.pushes, self.unreachable = pushes, unreachable
        self.stopped = False  # the deployment is gone: nothing more is sent
        self._boxes: list[list[m.Command]] = [[] for _ in pushes]
        self._epoch = 0
        self._pending = False

    def put(self, rank: int, command: m.Command) -> None:
        if self.stopped:
            return
        self._boxes[rank].append(command)
        self.schedule()

    def schedule(self) -> None:
        """A round of envelopes at the end of this event-loop turn (also with nothing to send: it wakes the
        leaders, which step together under DP attention)."""
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def put_last(self, command: m.Command) -> None:
        """`command` to every leader now, after what waits for it (Shutdown: a leader not started is no failure)."""
        for box in self._boxes:
            box.append(command)
        self.flush(closing=True)

    def flush(self, closing: bool = False) -> None:
        """One envelope per leader (to every leader under DP attention: idle leaders wake together).
        A leader without a peer socket is gone (or, when `closing`, maybe not started: no failure)."""
        self._pending = False
        if self.stopped:
            return
        self._epoch += 1
        for rank, push in enumerate(self.pushes):
            commands, self._boxes[rank] = self._boxes[rank], []
            if not commands and len(self.pushes) == 1:
                continue
            try:
                push.send_pyobj(m.Envelope(self._epoch, commands), zmq.NOBLOCK)
            except zmq.Again:
                if closing:
                    continue
                self.unreachable(rank)
                return
