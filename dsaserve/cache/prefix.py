"""PrefixCache: a radix tree of full pages of tokens, so requests that repeat a prefix reuse its cache.

Each node is one full page: its page_size tokens and the page that holds their latents and index keys
(every layer, the MTP layer's too). The tree holds one reference on each page it caches
(PageAllocator refcounts); a request that reuses a prefix takes another, and never writes into it
(it computes from the first position after the shared pages). Pages only the tree holds are evicted
least recently used first, leaves before their parents, when the pool runs short.

Steps never walk the tree (it holds every cached page of the pool: with page size 1, a node per token).
Requests hold tree pages only along paths from the root (a match shares its whole path), so the pages
eviction could free are exactly the cached pages no request holds: the allocator counts them as
references move. Eviction pops a heap of leaves by last use; an entry goes stale when its node is touched
again, gains a child or leaves the tree, and is skipped (the heap is rebuilt once it holds twice the tree).

Nodes are ids into flat lists and children one dict keyed by (parent id, tokens), not an object per node:
the cyclic garbage collector tracks no object per cached page. With an object (and a dict) per node a full
pool held hundreds of thousands of tracked objects, and each full collection walked them all, stalling
a decode step for tens to hundreds of milliseconds.

With MTP speculation the MTP layer's entry at position p depends on the token at p + 1, so a page's
entries fit only the token that followed it in the request that wrote it: with MTP a node is keyed by its
tokens and that next token (`_next`; a request's cache is inserted with the token after it, and a page whose
next token is not known yet is not cached). Two requests that go on differently right after the same page
each cache their own copy of it, and a match walks only through pages whose next token is the request's own.
(Keyed by tokens alone, the second writer's pages hung under the first's copy, where no match could reach
them: with page size 1 every divergence falls on a page boundary.) One DP group has one cache (its own scheduler
and pool).
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from dsaserve.cache.pages import PageAllocator


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens of admitted requests
    hit_tokens: int = 0  # of those, served from the cache
    evicted_pages: int = 0


ROOT = 0  # node id of the root (no tokens, no page)


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int, mtp: bool = False):
        """mtp: the pages hold the MTP layer's entries too (the next-token rule of the module doc)."""
        self.allocator, self.page_size, self.mtp = allocator, page_size, mtp
        # Node i: its page, parent, tokens, last use (-1: evicted, the id is spare) and number of children.
        self._page, self._parent, self._tokens = [0], [-1], [()]
        self._used, self._kids = [0], [0]
        self._next = [-1]  # MTP: the token after the node's page in the request that wrote it (else -1)
        self._child: dict[tuple[int, tuple[int, ...], int], int] = {}  # (parent, tokens, next) -> node
        self._spare: list[int] = []  # ids of evicted nodes, for reuse
        self.stats = PrefixStats()
        self._clock = itertools.count(1)
        self.num_pages = 0
        self._leaves: list[tuple[int, int, int]] = []  # heap (last use, tie-break, node): eviction candidates
        self._ticket = itertools.count()

    def _chunks(self, tokens: list[int], pages: int) -> list[tuple[int, ...]]:
        ps = self.page_size
        return [tuple(tokens[i * ps:(i + 1) * ps]) for i in range(pages)]

    def match(self, tokens: list[int], limit: int, record_hits: bool = True) -> list[int]:
        """Pages of the longest cached prefix of `tokens` covering at most `limit` tokens, each with a new
        reference for the caller (it must free them); [] on a miss. record_hits=False leaves the hit
        statistics to the caller (`count`), for a match it may still give back."""
        node, path, now = ROOT, [], next(self._clock)
        for i, chunk in enumerate(self._chunks(tokens, limit // self.page_size)):
            key = self._key(node, chunk, tokens, i)
            child = self._child.get(key) if key is not None else None
            if child is None:
                break
            node = child
            self._used[node] = now
            path.append(self._page[node])
        if path and not self._kids[node]:  # only a path's last node can be a leaf
            self._push(node)
        self.allocator.share(path)
        if record_hits:
            self.count(len(tokens), len(path))
        return path

    def count(self, queried_tokens: int, hit_pages: int) -> None:
        self.stats.queried_tokens += queried_tokens
        self.stats.hit_tokens += hit_pages * self.page_size

    def insert(self, tokens: list[int], pages: list[int], written: int | None = None) -> None:
        """Cache the full pages of the first `written` tokens (default all; held in `pages`): new nodes take a
        reference on the caller's page; where the tree already has the same tokens it keeps its own page. A
        token of `tokens` past `written` is the one that followed them (a node's `_next`)."""
        node, now = ROOT, next(self._clock)
        written = len(tokens) if written is None else min(written, len(tokens))
        full = min(written // self.page_size, len(pages))
        for i, (chunk, page) in enumerate(zip(self._chunks(tokens, full), pages)):
            if (key := self._key(node, chunk, tokens, i)) is None:
                break  # MTP: the token after this page is not known yet
            child = self._child.get(key)
            if child is None:
                child = self._add(key, page)
                self.allocator.share_cached(page)
            self._used[child] = now
            node = child
        if node != ROOT and not self._kids[node]:
            self._push(node)

    def _key(self, parent: int, chunk: tuple[int, ...], tokens: list[int],
             i: int) -> tuple[int, tuple[int, ...], int] | None:
        """The child key of `chunk`, the i-th page of `tokens`: with MTP it holds the token after the page (None
        where `tokens` ends with the page: no such node can be matched)."""
        if not self.mtp:
            return parent, chunk, -1
        after = (i + 1) * self.page_size
        return (parent, chunk, tokens[after]) if after < len(tokens) else None

    def _add(self, key: tuple[int, tuple[int, ...], int], page: int) -> int:
        parent, tokens, next_token = key
        if self._spare:
            node = self._spare.pop()
            self._page[node], self._parent[node], self._tokens[node], self._kids[node] = page, parent, tokens, 0
            self._next[node] = next_token
        else:
            node = len(self._page)
            for column, value in ((self._page, page), (self._parent, parent), (self._tokens, tokens),
                                  (self._used, 0), (self._kids, 0), (self._next, next_token)):
                column.append(value)
        self._child[key] = node
        self._kids[parent] += 1
        self.num_pages += 1
        return node

    def evict(self, pages: int) -> int:
        """Free up to `pages` pages that only the tree holds, least recently used leaves first (a parent
        becomes a candidate once its last child is gone)."""
        freed, held, pages = 0, [], min(pages, self.allocator.cached_only)
        while self._leaves and freed < pages:
            used, _, leaf = heapq.heappop(self._leaves)
            if used != self._used[leaf] or self._kids[leaf]:
                continue  # stale: evicted (and maybe reused), no longer a leaf, or touched since (a newer entry)
            if self.allocator.refcount(self._page[leaf]) > 1:
                held.append(leaf)  # a request holds it: a candidate again once it lets go
                continue
            parent = self._parent[leaf]
            del self._child[(parent, self._tokens[leaf], self._next[leaf])]
            self._kids[parent] -= 1
            self._used[leaf], self._tokens[leaf] = -1, ()
            self._spare.append(leaf)
            self.allocator.free_cached(self._page[leaf])
            freed += 1
            if parent != ROOT and not self._kids[parent]:
                self._push(parent)
        for leaf in held:
            self._push(leaf)
        self.num_pages -= freed
        self.stats.evicted_pages += freed
        return freed

    def reclaimable(self) -> int:
        """Pages only the tree holds: what evict() could free now (module doc: held pages are root paths)."""
        return self.allocator.cached_only

    def _push(self, node: int) -> None:
        heapq.heappush(self._leaves, (self._used[node], next(self._ticket), node))
        if len(self._leaves) > 2 * self.num_pages + 64:  # mostly stale entries: keep the current leaves
            self._leaves = self._current_leaves()
            heapq.heapify(self._leaves)

    def _current_leaves(self) -> list[tuple[int, int, int]]:
        """Heap entries of every cached leaf (a pass over all node ids)."""
        return [(used, next(self._ticket), node) for node, used in enumerate(self._used)
                if used > 0 and not self._kids[node]]
