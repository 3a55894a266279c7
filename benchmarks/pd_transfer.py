"""KV transfer throughput of the PD path: the NIXL backend (dsaserve.disagg.transport) writing page runs of
every layer buffer from one process to another, against a plain device-to-device copy of the same bytes.

Default shapes: DeepSeek-V3.2's cache per page of 64 tokens (61 layers latent 576 x bf16, 61 index-key
layers 128 x bf16, + the MTP layer's), as a prefill -> decode transfer of PROMPT tokens. On GPUs the
sender uses cuda:0 and the receiver cuda:1; on CPU both use DRAM. Checks the bytes that arrived, and
states the transfer's rate as a fraction of one contiguous copy of the same bytes between the same devices.

    python benchmarks/pd_transfer.py --prompt 4096 8192 --fragmented
    python benchmarks/pd_transfer.py --devices cuda:0 cuda:0   # one GPU: two processes, GPU memory both sides
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import time
from pathlib import Path

import torch

from dsaserve.disagg.pages import page_runs
from dsaserve.disagg.protocol import room_tag

LAYERS, PAGE = 62, 64
CACHE_FORMAT = "bench-bf16"  # what the bytes mean: both sides must name the same format
PAGE_BYTES = (PAGE * 576 * 2, PAGE * 128 * 2)  # latent, index keys (bf16)


def buffers(pages: int, device: str, fill: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(fill)
    return [torch.randint(0, 255, (pages, pb), dtype=torch.uint8, generator=gen).to(device)
            for pb in PAGE_BYTES for _ in range(LAYERS)]


def flat_copy_seconds(nbytes: int, src_dev: str, dst_dev: str, repeats: int = 3) -> float:
    """The ceiling: one contiguous copy of the same bytes from the sender's device to the receiver's (best of
    `repeats`), the rate a transfer of many page runs can at most approach."""
    src, dst = torch.empty(nbytes, dtype=torch.uint8, device=src_dev), torch.empty(nbytes, dtype=torch.uint8,
                                                                                  device=dst_dev)
    sync = torch.cuda.synchronize if src_dev.startswith("cuda") or dst_dev.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy also pays for first-touch and peer setup
        sync()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def receiver(device: str, pages: int, inbox: mp.Queue, outbox: mp.Queue) -> None:
    from dsaserve.disagg.transport import NixlTransport
    bufs = buffers(pages, device, fill=0)
    t = NixlTransport(bufs, CACHE_FORMAT)
    outbox.put(t.descriptor())
    while True:
        try:
            job = inbox.get(timeout=0.001)
        except queue.Empty:
            t.progress()  # a write may be coming: the receiver drives NIXL's progress, as the engine does
            continue
        if job is None:
            break
        sender, room, dst = job
        deadline = time.monotonic() + 120
        while not t.arrived(sender, room_tag(room)) and time.monotonic() < deadline:
            time.sleep(0.0001)
        outbox.put(time.monotonic() < deadline)  # the sender's clock stops here, before the check below
        outbox.put(sum(int(b[dst].sum()) for b in bufs))
    t.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--fragmented", action="store_true", help="every other page (runs of one page)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--devices", nargs=2, default=None, metavar=("SRC", "DST"),
                    help="sender and receiver devices (default: cuda:0 cuda:1 with two GPUs, else cpu cpu); "
                         "cuda:0 cuda:0 moves GPU memory between two processes on one GPU")
    ns = ap.parse_args()
    from dsaserve.disagg.transport import NixlTransport
    if ns.devices:
        src_dev, dst_dev = ns.devices
    else:
        src_dev, dst_dev = ("cuda:0", "cuda:1") if torch.cuda.device_count() >= 2 else ("cpu", "cpu")
    pages = 2 * max(-(-p // PAGE) for p in ns.prompt) + 2
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=receiver, args=(dst_dev, pages, inbox, outbox))
    proc.start()
    header, blob = outbox.get(timeout=120)
    bufs = buffers(pages, src_dev, fill=1)
    sender = NixlTransport(bufs, CACHE_FORMAT)
    rows, room = [], 0
    for prompt in ns.prompt:
        n = -(-prompt // PAGE)
        src = list(range(1, 2 * n, 2)) if ns.fragmented else list(range(1, n + 1))
        dst = list(range(2, 2 * n + 1, 2)) if ns.fragmented else list(range(1, n + 1))
        runs = page_runs(src, dst)
        nbytes = n * LAYERS * sum(PAGE_BYTES)
        times = []
        for _ in range(ns.repeats):
            room += 1
            start = time.perf_counter()
            handle = sender.write(header, blob, runs, room_tag(room))
            posted = time.perf_counter()
            while not sender.poll(handle):
                pass
            sent = time.perf_counter()
            inbox.put((sender.agent, room, dst))
            if not outbox.get(timeout=150):
                raise SystemExit(f"the write of {prompt} tokens did not arrive within 120 s")
            times.append((time.perf_counter() - start, posted - start, sent - start))
            digest = outbox.get(timeout=120)
        want = sum(int(b[src].sum()) for b in bufs)
        assert digest == want, f"the bytes that arrived differ ({digest} != {want})"
        copy_s = flat_copy_seconds(nbytes, src_dev, dst_dev)
        best, post, done = min(times)
        rows.append((prompt, len(runs), nbytes / 2**20, post * 1e3, done * 1e3, best * 1e3, nbytes / best / 1e9,
                     nbytes / copy_s / 1e9, copy_s / best))
    inbox.put(None)
    proc.join(60)
    print(f"\nNIXL write {src_dev} -> {dst_dev} ({LAYERS} layers x 2 pools, pages of {PAGE} tokens)")
    print("(posted: the write call returned; sent: the sender's poll says done; arrived: the receiver saw it, through\n"
          " the benchmark's own queue round trip)")
    print(f"{'prompt':>8} {'runs':>6} {'MiB':>9} {'posted ms':>10} {'sent ms':>8} {'arrived ms':>11} {'NIXL GB/s':>10} "
          f"{'copy GB/s':>10} {'of copy':>8}")
    for r in rows:
        print(f"{r[0]:>8} {r[1]:>6} {r[2]:>9.1f} {r[3]:>10.2f} {r[4]:>8.2f} {r[5]:>11.2f} {r[6]:>10.2f} {r[7]:>10.2f} "
              f"{r[8]:>8.1%}")
    if ns.out:
        keys = ("prompt", "runs", "MiB", "posted_ms", "sent_ms", "ms", "nixl_GBps", "copy_GBps", "fraction_of_copy")
        Path(ns.out).write_text(json.dumps({"src": src_dev, "dst": dst_dev, "fragmented": ns.fragmented,
                                            "rows": [dict(zip(keys, r)) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
