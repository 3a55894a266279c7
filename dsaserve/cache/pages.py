"""PageAllocator: a free list of page ids with refcounts. Page 0 is reserved (dummy rows, padding).
PageArray / PageMirror: a request's page ids as int32 for the step's page table (engine/layout.py)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (one is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._cached = bytearray(num_pages)  # 1: the prefix cache holds one of the page's references
        self.cached_only = 0  # cached pages no one else holds: what evicting the cache could free
        self.changes = 0  # bumped by every alloc / share / free: a cheap "did ownership move" signal

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages a request may ever hold: all but the reserved page."""
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int]:
        if n == 0:  # most decode steps of most requests: no new page, no ownership change
            return []
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        self.changes += 1
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def share(self, pages: list[int]) -> None:
        """Another owner takes a reference (prefix sharing)."""
        self.changes += 1
        for p in pages:
            assert self._refs[p] > 0, f"page {p} is not allocated"
            if self._cached[p] and self._refs[p] == 1:
                self.cached_only -= 1
            self._refs[p] += 1

    def free(self, pages: list[int]) -> None:
        self.changes += 1
        released = []
        try:
            for p in pages:
                assert self._refs[p] > 0, f"page {p} freed twice"
                self._refs[p] -= 1
                if self._cached[p] and self._refs[p] == 1:
                    self.cached_only += 1
                if self._refs[p] == 0:
                    released.append(p)
        finally:  # (a double free stops the loop: the pages released before it still return)
            # pushed last-first so that the next alloc pops them in the order they were held: a request's run
            # of pages comes back as a run, which a PD transfer moves as one descriptor per buffer (a page
            # handed out in reverse is a descriptor of its own: about 8 us each over NIXL, docs/benchmarks.md)
            self._free.extend(reversed(released))

    def share_cached(self, page: int) -> None:
        """The prefix cache takes its reference on a page the caller holds: the page counts in cached_only
        once every other owner lets go (free)."""
        assert not self._cached[page], f"page {page} is cached twice"
        self.share([page])
        assert self._refs[page] >= 2, f"page {page} is cached without an owner"
        self._cached[page] = 1

    def free_cached(self, page: int) -> None:
        """The prefix cache drops its reference (eviction)."""
        assert self._cached[page], f"page {page} is not cached"
        if self._refs[page] == 1:
            self.cached_only -= 1
        self._cached[page] = 0
        self.free([page])


@dataclass
class PageArray:
    """Page ids as a growable int32 array whose views never change: extending writes past every view taken, and
    growing past the buffer moves to a new one."""
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(16, dtype=np.int32))
    size: int = 0

    def extend(self, ids: Sequence[int]) -> None:
        n = self.size + len(ids)
        if n > len(self.buffer):
            grown = np.zeros(max(n, 2 * len(self.buffer)), dtype=np.int32)
            grown[:self.size] = self.buffer[:self.size]
            self.buffer = grown
        self.buffer[self.size:n] = ids
        self.size = n

    def view(self) -> np.ndarray:
        return self.buffer[:self.size]


@dataclass
class PageMirror:
    """A request's page list as a PageArray, extended as the list grows: a step copies it into its page table
    instead of converting the whole list again (at page size 1 a request holds a page per token: 16 x 32K
    contexts took 12 ms a step). The list is only ever extended or replaced, never edited; a replaced list (a
    release, a re-admission, a hand-over) starts a new array and a new generation (engine/page_sync.py)."""
    source: list[int] | None = None
    array: PageArray = field(default_factory=PageArray)
    generation: int = 0

    def view(self, pages: list[int]) -> np.ndarray:
        if self.source is not pages or len(pages) < self.array.size:
            self.source, self.array, self.generation = pages, PageArray(), self.generation + 1
        if len(pages) > self.array.size:
            self.array.extend(pages[self.array.size:])
        return self.array.view()
