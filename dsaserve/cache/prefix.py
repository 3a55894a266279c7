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

With MTP speculation the MTP layer's entry at position p depends on the token at p + 1, which may
differ between two requests that share the page holding p: a match then gives back one page less,
so the last shared position always has the same next token (the first token of the next matched
page). One DP group has one cache (its own scheduler and pool).
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from dsaserve.cache.pages import PageAllocator


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]
    page: int
    parent: _Node | None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    last_used: int = 0
    cached: bool = True  # False once evicted: its heap entries are stale


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens of admitted requests
    hit_tokens: int = 0  # of those, served from the cache
    evicted_pages: int = 0


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int, drop_last_page: bool = False):
        self.allocator, self.page_size, self.drop_last_page = allocator, page_size, drop_last_page
        self.root = _Node((), 0, None)
        self.stats = PrefixStats()
        self._clock = itertools.count(1)
        self.num_pages = 0
        self._leaves: list[tuple[int, int, _Node]] = []  # heap (last_used, tie-break, node): eviction candidates
        self._ticket = itertools.count()

    def _chunks(self, tokens: list[int], pages: int) -> list[tuple[int, ...]]:
        ps = self.page_size
        return [tuple(tokens[i * ps:(i + 1) * ps]) for i in range(pages)]

    def match(self, tokens: list[int], limit: int, record_hits: bool = True) -> list[int]:
        """Pages of the longest cached prefix of `tokens` covering at most `limit` tokens, each with a new
        reference for the caller (it must free them); [] on a miss. record_hits=False leaves the hit
        statistics to the caller (`count`), for a match it may still give back."""
        node, path, now = self.root, [], next(self._clock)
        for chunk in self._chunks(tokens, limit // self.page_size):
            child = node.children.get(chunk)
            if child is None:
                break
            node = child
            node.last_used = now
            path.append(node.page)
        if path and not node.children:  # only a path's last node can be a leaf
            self._push(node)
        if self.drop_last_page and path:
            path.pop()
        self.allocator.share(path)
        if record_hits:
            self.count(len(tokens), len(path))
        return path

    def count(self, queried_tokens: int, hit_pages: int) -> None:
        self.stats.queried_tokens += queried_tokens
        self.stats.hit_tokens += hit_pages * self.page_size

    def insert(self, tokens: list[int], pages: list[int]) -> None:
        """Cache the full pages of `tokens` (held in `pages`): new nodes take a reference on the caller's
        page; where the tree already has the same tokens it keeps its own page."""
        node, now = self.root, next(self._clock)
        full = min(len(tokens) // self.page_size, len(pages))
        for chunk, page in zip(self._chunks(tokens, full), pages):
            child = node.children.get(chunk)
            if child is None:
                child = node.children[chunk] = _Node(chunk, page, node)
                self.allocator.share_cached(page)
                self.num_pages += 1
            child.last_used = now
            node = child
        if node is not self.root and not node.children:
            self._push(node)

    def evict(self, pages: int) -> int:
        """Free up to `pages` pages that only the tree holds, least recently used leaves first (a parent
        becomes a candidate once its last child is gone)."""
        freed, held, pages = 0, [], min(pages, self.allocator.cached_only)
        while self._leaves and freed < pages:
            used, _, leaf = heapq.heappop(self._leaves)
            if not leaf.cached or leaf.children or used != leaf.last_used:
                continue  # stale: evicted, no longer a leaf, or touched since (a newer entry exists)
            if self.allocator.refcount(leaf.page) > 1:
                held.append(leaf)  # a request holds it: a candidate again once it lets go
                continue
            parent = leaf.parent
            del parent.children[leaf.tokens]  # type: ignore[union-attr]
            leaf.cached = False
            self.allocator.free_cached(leaf.page)
            freed += 1
            if parent is not self.root and not parent.children:  # type: ignore[union-attr]
                self._push(parent)  # type: ignore[arg-type]
        for leaf in held:
            self._push(leaf)
        self.num_pages -= freed
        self.stats.evicted_pages += freed
        return freed

    def reclaimable(self) -> int:
        """Pages only the tree holds: what evict() could free now (module doc: held pages are root paths)."""
        return self.allocator.cached_only

    def _push(self, node: _Node) -> None:
        heapq.heappush(self._leaves, (node.last_used, next(self._ticket), node))
        if len(self._leaves) > 2 * self.num_pages + 64:  # mostly stale entries: keep the current leaves
            self._leaves = [(n.last_used, next(self._ticket), n) for n in self._nodes() if not n.children]
            heapq.heapify(self._leaves)

    def _nodes(self) -> list[_Node]:
        """Every node, each after its parent."""
        out, todo = [], list(self.root.children.values())
        while todo:
            node = todo.pop()
            out.append(node)
            todo += node.children.values()
        return out
