"""PD disaggregation's NIXL transport on its own: two real agents in one process (UCX over loopback, DRAM), each
progressed only when the test says, as the engine's loop does (NIXL runs without its progress thread)."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import pytest
import torch

from dsaserve.disagg.pages import PageRun
from dsaserve.disagg.transport import NixlTransport

pytestmark = pytest.mark.timeout(120)
PAGES, PAGE_BYTES = 8, 4096


@contextlib.contextmanager
def transport(fill: int) -> Iterator[NixlTransport]:
    t = NixlTransport([torch.full((PAGES, PAGE_BYTES), fill, dtype=torch.uint8)], "test-rows")
    try:
        yield t
    finally:
        t.close()


def test_nixl_cannot_stop_a_write_its_receiver_has_not_taken() -> None:
    """A write to a receiver that makes no progress calls does not end; releasing its handle (what cancel() did,
    returning True: stopped) succeeds, yet the data lands once the receiver progresses. So cancel() says it could
    not stop the write, and the prefill side polls it until it ends instead of letting the decode server reuse the
    pages under it."""
    with transport(0xAB) as sender, transport(0) as receiver:
        header, blob = receiver.descriptor()
        handle = sender.write(header, blob, [PageRun(src=0, dst=2, length=3)], b"room-7;")
        for _ in range(50):  # the receiver is idle: UCX connects and moves data only with its progress
            assert not sender.poll(handle)
        assert sender.cancel(handle) is False, "a write NIXL cannot stop was reported stopped"
        deadline = time.monotonic() + 30  # (a liveness bound: it lands in milliseconds)
        done = False
        while not done and time.monotonic() < deadline:
            receiver.progress()
            done = sender.poll(handle)
        assert done and receiver.arrived(sender.agent, b"room-7;")
        rows = receiver.buffers[0]
        assert bool((rows[2:5] == 0xAB).all()) and not rows[:2].any() and not rows[5:].any()


def test_a_released_nixl_write_still_lands() -> None:
    """Why cancel() cannot say stopped (NIXL 1.5.1): releasing a running write's handle succeeds, and the write
    lands all the same once both agents progress. A NIXL that truly cancelled would fail this test: cancel() could
    then release and return True again."""
    with transport(0xCD) as sender, transport(0) as receiver:
        header, blob = receiver.descriptor()
        handle = sender.write(header, blob, [PageRun(src=1, dst=4, length=2)], b"room-8;")
        assert not sender.poll(handle)
        sender.nixl.release_xfer_handle(handle)  # no error: NIXL forgets the write
        sender._writes.pop(handle)
        rows = receiver.buffers[0]
        deadline = time.monotonic() + 30  # (a liveness bound: it lands in milliseconds)
        while not bool((rows[4:6] == 0xCD).all()) and time.monotonic() < deadline:
            receiver.progress()
            sender.progress()  # (progresses the sender's UCX worker too)
        assert bool((rows[4:6] == 0xCD).all()) and not rows[:4].any() and not rows[6:].any()


def test_a_write_moves_every_run_of_every_buffer() -> None:
    """Buffers of other page sizes (latent and index-key pools) and runs of other lengths, out of order: each
    destination page receives its source page, and no other page changes (the descriptors are built as arrays,
    buffer by buffer, one row per run)."""
    sizes = (4096, 1024, 3072)
    sources = [torch.arange(16 * pb, dtype=torch.int64).remainder(251).to(torch.uint8).view(16, pb) + i
               for i, pb in enumerate(sizes)]
    runs = [PageRun(src=9, dst=0, length=3), PageRun(src=1, dst=7, length=1), PageRun(src=4, dst=12, length=2)]
    sender = NixlTransport(sources, "test-rows")
    receiver = NixlTransport([torch.zeros(16, pb, dtype=torch.uint8) for pb in sizes], "test-rows")
    try:
        header, blob = receiver.descriptor()
        handle = sender.write(header, blob, runs, b"room-9;")
        deadline = time.monotonic() + 30  # (a liveness bound: it lands in milliseconds)
        done = False
        while not done and time.monotonic() < deadline:
            receiver.progress()
            done = sender.poll(handle)
        assert done
        for src, dst in zip(sources, receiver.buffers):
            want = torch.zeros_like(dst)
            for run in runs:
                want[run.dst:run.dst + run.length] = src[run.src:run.src + run.length]
            assert torch.equal(dst, want)
    finally:
        sender.close()
        receiver.close()
