"""KV transfer backends behind one interface: the receiving side describes its page buffers, the sending
side writes page runs of every buffer into the receiver's and tags the write, and the receiver checks
that the tagged write has landed.

`nixl`: NIXL's Python API (UCX). DRAM buffers on CPU, VRAM on GPU; the same calls either way.
`fake`: no data moves (scheduler and failure tests); every write lands at once.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from dsaserve.disagg.pages import PageRun

log = logging.getLogger(__name__)
Tensor = torch.Tensor


class TransferFailed(RuntimeError):
    """A transfer could not start or did not complete: the request ends with this message."""


class KVTransport(ABC):
    """One per DP group leader, over its pools' page buffers (uint8 [num_pages, page_bytes] each)."""

    name = "base"

    def __init__(self, buffers: list[Tensor], cache_format: str):
        self.buffers = buffers
        self.page_bytes = [int(b.shape[1]) for b in buffers]
        self.cache_format = cache_format  # KVPools.row_format: what the bytes mean (equal sizes may differ)

    def descriptor(self) -> tuple[dict[str, Any], bytes]:
        """What a sender needs to write into this side's buffers: a JSON-able header and a binary blob."""
        return {"backend": self.name, "page_bytes": self.page_bytes, "cache_format": self.cache_format}, b""

    def check_peer(self, header: dict[str, Any]) -> str | None:
        """Why this side cannot write into the peer's buffers (None: it can)."""
        if header.get("backend") != self.name:
            return f"the decode server uses transfer backend {header.get('backend')!r}, this server {self.name!r}"
        if header.get("page_bytes") != self.page_bytes:
            theirs = header.get("page_bytes") or []
            return (f"the KV cache layouts differ: the decode server has {len(theirs)} page buffers of "
                    f"{sorted(set(theirs))} bytes per page, this server {len(self.page_bytes)} of "
                    f"{sorted(set(self.page_bytes))} (same model, --dtype, --kv-cache-dtype and --page-size on both "
                    f"sides?)")
        if header.get("cache_format") != self.cache_format:
            return (f"the KV cache formats differ: the decode server holds {header.get('cache_format')}, this server "
                    f"{self.cache_format} (same --dtype and --kv-cache-dtype on both sides?)")
        return None

    @abstractmethod
    def write(self, header: dict[str, Any], blob: bytes, runs: list[PageRun], tag: bytes) -> Any:
        """Start writing `runs` of every buffer into the peer's; returns a handle for poll()."""

    @abstractmethod
    def poll(self, handle: Any) -> bool:
        """True once the write is complete at the receiver; raises TransferFailed."""

    def cancel(self, handle: Any) -> bool:
        """Stop a write that is no longer wanted: True once it is stopped, False when it may still run (and land);
        poll() then tells when it ends."""
        return True

    def arrived(self, sender: str, tag: bytes) -> bool:
        """Receiver side: the write tagged `tag` by agent `sender` has landed; raises TransferFailed."""
        return True

    def progress(self) -> None:
        """Receiver side, while writes may be coming: let them advance (the backend runs no thread of its own);
        raises TransferFailed."""

    def keep_arrivals(self, tags: set[bytes]) -> None:
        """Receiver side: forget the arrivals of writes tagged otherwise (their requests ended: aborted, failed or
        timed out after the data landed), which would otherwise be kept for an arrived() that never comes."""

    def remote_agents(self) -> set[str]:
        """Sender side: the receivers this side holds metadata and connections for (write() adds them)."""
        return set()

    def remove_remote(self, agent: str, force: bool = False) -> bool:
        """Sender side: forget a receiver (its next write adds it again from the page ids' blob). False while a
        write to it may still run: also one the caller gave up on, released here once it has ended; with `force`,
        released and forgotten running (it may land all the same)."""
        return True

    @property
    def agent(self) -> str:
        return ""

    def close(self) -> None:
        pass


class FakeTransport(KVTransport):
    name = "fake"

    def write(self, header: dict[str, Any], blob: bytes, runs: list[PageRun], tag: bytes) -> Any:
        return tag

    def poll(self, handle: Any) -> bool:
        return True


def ucx_net_devices(ib_device: str, rdma_root: str = "/sys/class/infiniband") -> str:
    """--disaggregation-ib-device as UCX_NET_DEVICES: SGLang's form names RDMA devices bare ("mlx5_0,mlx5_1", for
    Mooncake); UCX names an RDMA device's port ("mlx5_0:1"; an mlx5 function has one port, 1). A bare name that is
    an RDMA device here (rdma_root) or has mlx5's form gets port 1; names with a port, network interfaces ("eth0")
    and "all" pass as they are."""
    def rdma(name: str) -> bool:
        return re.fullmatch(r"mlx\d+_\d+", name) is not None or os.path.isdir(os.path.join(rdma_root, name))
    names = [name.strip() for name in ib_device.split(",") if name.strip()]
    return ",".join(f"{name}:1" if ":" not in name and rdma(name) else name for name in names)


class NixlTransport(KVTransport):
    name = "nixl"

    def __init__(self, buffers: list[Tensor], cache_format: str, ib_device: str | None = None):
        super().__init__(buffers, cache_format)
        if ib_device:
            os.environ["UCX_NET_DEVICES"] = ucx_net_devices(ib_device)  # read by UCX when it creates its backend
        api = _nixl_api()
        self._name = f"dsaserve-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # No progress thread: NIXL's spins a core per rank even when idle (its poll delay is 0). The engine
        # drives progress instead, every millisecond while a write is in flight (sender: poll; receiver:
        # progress), and blocks when none is.
        self.nixl = api.nixl_agent(self._name, api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        cuda = bool(buffers) and buffers[0].is_cuda
        self.mem = "VRAM" if cuda else "DRAM"
        self.dev = (buffers[0].device.index or 0) if cuda else 0
        regions = [(b.data_ptr(), b.numel(), self.dev, "") for b in buffers]
        self._registered = self.nixl.register_memory(regions, self.mem)
        self._bases = np.array([b.data_ptr() for b in buffers], dtype=np.int64)
        self._remotes: set[str] = set()
        self._writes: dict[Any, str] = {}  # handles NIXL holds (not released yet) -> their receiver
        self._descriptor: tuple[dict[str, Any], bytes] | None = None

    @property
    def agent(self) -> str:
        return self._name

    def descriptor(self) -> tuple[dict[str, Any], bytes]:
        if self._descriptor is None:  # the buffers and the agent never change: made once, sent with each request
            header, _ = super().descriptor()
            header.update(agent=self._name, bases=[b.data_ptr() for b in self.buffers], dev=self.dev, mem=self.mem)
            self._descriptor = header, self.nixl.get_agent_metadata()
        return self._descriptor

    def write(self, header: dict[str, Any], blob: bytes, runs: list[PageRun], tag: bytes) -> Any:
        try:
            peer = header["agent"]
            if peer not in self._remotes:
                self.nixl.add_remote_agent(blob)
                self._remotes.add(peer)
            src, dst, length = (np.array(field, dtype=np.int64) for field in zip(*((r.src, r.dst, r.length)
                                                                                    for r in runs)))
            page_bytes = np.array(self.page_bytes, dtype=np.int64)
            local = _descriptors(self._bases, page_bytes, src, length, self.dev)
            remote = _descriptors(np.array(header["bases"], dtype=np.int64), page_bytes, dst, length, header["dev"])
            handle = self.nixl.initialize_xfer("WRITE", self.nixl.get_xfer_descs(local, self.mem),
                                               self.nixl.get_xfer_descs(remote, header["mem"]), peer, tag)
            if self.nixl.transfer(handle) == "ERR":
                self._release(handle)
                raise TransferFailed(f"NIXL could not start the write to {peer}")
            self._writes[handle] = peer
            return handle
        except TransferFailed:
            raise
        except Exception as exc:  # NIXL raises its own errors (peer gone, bad descriptors)
            raise TransferFailed(f"NIXL write failed: {type(exc).__name__}: {exc}") from exc

    def poll(self, handle: Any) -> bool:
        try:
            state = self.nixl.check_xfer_state(handle)
        except Exception as exc:
            self._release(handle)
            raise TransferFailed(f"NIXL transfer failed: {type(exc).__name__}: {exc}") from exc
        if state == "PROC":
            return False
        self._release(handle)
        if state != "DONE":
            raise TransferFailed(f"NIXL transfer ended in state {state}")
        return True

    def cancel(self, handle: Any) -> bool:
        # NIXL cannot stop a posted write. Releasing its handle succeeds but only forgets it: measured with NIXL
        # 1.5.1 over UCX (DRAM, two processes), a write the receiver had not progressed yet landed whole (4 KiB and
        # 64 MiB) once it did, also after remove_remote_agent; only its arrival notice was lost. So it is never
        # stopped: the caller polls it until it ends.
        return False

    def _release(self, handle: Any) -> bool:
        try:
            self.nixl.release_xfer_handle(handle)
            self._writes.pop(handle, None)
            return True
        except Exception:  # (NIXL 1.5.1's UCX backend always releases, see cancel(); another may refuse and keep it)
            log.warning("NIXL could not release a transfer handle", exc_info=True)
            return False

    def arrived(self, sender: str, tag: bytes) -> bool:
        try:
            return self.nixl.check_remote_xfer_done(sender, tag)  # tags end with ';': a prefix names one room
        except Exception as exc:
            raise TransferFailed(f"NIXL could not tell the write's arrival: {type(exc).__name__}: {exc}") from exc

    def progress(self) -> None:
        try:
            self.nixl.update_notifs()  # progresses the UCX worker (and keeps the notifications for arrived())
        except Exception as exc:
            raise TransferFailed(f"NIXL could not progress: {type(exc).__name__}: {exc}") from exc

    def keep_arrivals(self, tags: set[bytes]) -> None:
        notifs = self.nixl.notifs  # agent -> notification messages, each a room tag (kept until looked up)
        for agent in list(notifs):
            notifs[agent] = [m for m in notifs[agent] if m[:m.find(b";") + 1] in tags]
            if not notifs[agent]:
                del notifs[agent]

    def remote_agents(self) -> set[str]:
        return set(self._remotes)

    def remove_remote(self, agent: str, force: bool = False) -> bool:
        # Removing disconnects: every write to it must have ended first (a live one's arrival notice would be lost).
        # Handles left here are writes the caller gave up on (no request waits for them), released once NIXL says
        # they ended. One runs until its receiver progresses, which an idle or stopped receiver may never do: `force`
        # releases it anyway (NIXL forgets it; as measured in cancel(), it may land all the same).
        running = 0
        for handle in [h for h, a in self._writes.items() if a == agent]:
            try:
                runs = self.nixl.check_xfer_state(handle) == "PROC"
            except Exception:  # it failed: ended
                runs = False
            if (runs and not force) or not self._release(handle):
                return False
            running += runs
        if running:
            log.warning("NIXL remote agent %s removed under %d write(s) given up on and still running", agent, running)
        if agent in self._remotes:
            try:
                self.nixl.remove_remote_agent(agent)
            except Exception:  # still known to NIXL: kept, so a later write does not add it twice
                log.warning("NIXL could not remove remote agent %s", agent, exc_info=True)
                return True
            self._remotes.discard(agent)
        return True

    def close(self) -> None:
        try:
            self.nixl.deregister_memory(self._registered)
        except Exception:
            log.warning("NIXL could not deregister the KV pools", exc_info=True)


def _descriptors(bases: np.ndarray, page_bytes: np.ndarray, first: np.ndarray, pages: np.ndarray,
                 dev: int) -> np.ndarray:
    """NIXL's [n, 3] (address, bytes, device) rows of every run of every buffer, buffer by buffer: built as arrays,
    since a Python tuple per row cost ~4 us, 33-55 ms for a prompt scattered over 64 page runs of 124 buffers
    (NIXL's own part of a write, from the arrays, is under a millisecond there)."""
    out = np.empty((bases.size * first.size, 3), dtype=np.int64)
    out[:, 0] = (bases[:, None] + first[None, :] * page_bytes[:, None]).reshape(-1)
    out[:, 1] = (pages[None, :] * page_bytes[:, None]).reshape(-1)
    out[:, 2] = dev
    return out


def _nixl_api() -> Any:
    """NIXL's Python API: the `nixl` meta package when installed, else the CUDA 12 or 13 build directly."""
    for module in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            return __import__(module, fromlist=["nixl_agent"])
        except ImportError:
            continue
    raise ValueError("--disaggregation-transfer-backend nixl needs NIXL's Python API: pip install nixl-cu12 "
                     "(or nixl-cu13)")


def create_transport(backend: str, buffers: list[Tensor], cache_format: str, ib_device: str | None) -> KVTransport:
    if backend == "nixl":
        return NixlTransport(buffers, cache_format, ib_device)
    if backend == "fake":
        return FakeTransport(buffers, cache_format)
    raise ValueError(f"transfer backend {backend!r} is not available")
