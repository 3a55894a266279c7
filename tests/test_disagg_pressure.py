"""PD disaggregation under decode-pool pressure: page ids that go out late (the decode pool was busy) are
answered, whatever the two servers' timeouts. A prefill engine and a decode engine in one process (real ZMQ
control sockets, the `fake` transfer backend), both on one fake clock."""
from __future__ import annotations

import time

import pytest

from dsaserve.engine.request import DisaggRoute, RequestOutput
from test_disagg_engine import assert_pools_whole, pd_pair
from test_disagg_waits import GREEDY, SMALL, two_prompts

pytestmark = pytest.mark.timeout(120)


def test_page_ids_that_come_after_the_prefill_half_ended_long_ago_are_answered(
        tiny_ds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill half timed out (its timeout 1 s) and the decode pool (timeout 60 s) was busy for 2 s more:
    the room's `ended` entry was gone when the page ids came, they sat unclaimed and expired unanswered, and
    the decode request held its pages for its whole 60 s. Now unclaimed page ids are answered `failed` when
    they expire (after the prefill server's timeout)."""
    now = [0.0]
    with pd_pair(tiny_ds, backend="fake", page_size=4, prefill=dict(disaggregation_timeout_s=1),
                 decode=dict(disaggregation_timeout_s=60, **SMALL)) as (pre, dec):
        for side in (pre.disagg, dec.disagg):
            monkeypatch.setattr(side.deadlines, "clock", lambda: now[0])
        a, b = two_prompts(dec)
        peer = f"tcp://127.0.0.1:{pre.disagg.port}"
        dec.add_request("blocker", a, GREEDY)  # a whole request: holds the decode pool once prefilled
        dec.step()
        pre.add_request("p", b, GREEDY, DisaggRoute(2))
        dec.add_request("d", b, GREEDY, DisaggRoute(2, peer))
        assert not dec.disagg.rooms[2].sent
        finals: dict[str, RequestOutput] = {}
        sent_at = None
        for i in range(800):  # 10 ms of the fake clock a round: 8 s in all, well within the decode timeout
            if i == 300:  # 3 s: the prefill half ended at 1 s, its `ended` entry at 2 s
                assert "p" in finals and "d" not in finals
                dec.abort("blocker")  # (it did not step meanwhile) its pages come back: d's page ids go out
            outputs = pre.step() + pre.take_finished() + (dec.step() if i >= 300 else dec.poll_transfers())
            finals.update((o.rid, o) for o in outputs + dec.take_finished() if o.finished)
            if sent_at is None and 2 in dec.disagg.rooms and dec.disagg.rooms[2].sent:
                sent_at = now[0]
            if "d" in finals and not dec.disagg.rooms:
                break
            now[0] += 0.01
            time.sleep(0.002)  # the control messages' real time
        assert sent_at is not None and sent_at > 2.5  # after the `ended` entry went
        assert "d" in finals, "the decode request still holds its pages for page ids nobody will answer"
        assert finals["d"].finish.kind == "error" and "claimed the page ids" in finals["d"].finish.message
        assert now[0] <= sent_at + 1.5  # the prefill server's timeout after they came, not the decode server's
        assert_pools_whole(pre, dec)
