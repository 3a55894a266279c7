"""Which pages move, and in which contiguous runs (invariant 6).

Both servers enumerate a request's pages over the same length, the prompt length: the prefill side
may hold more pages (the page its sampled token opened, the slots of its first drafts) and the
decode side pre-allocates exactly the prompt's. `prompt_pages` is that enumeration on both sides and
`page_runs` the one grouping of source and destination pages into runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


class PageCountMismatch(ValueError):
    """Source and destination page lists differ in length: the transfer would misplace the cache."""


@dataclass(frozen=True)
class PageRun:
    src: int  # first source page
    dst: int  # first destination page
    length: int  # pages


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def prompt_pages(pages: Sequence[int], prompt_len: int, page_size: int) -> list[int]:
    """The pages that hold a prompt of prompt_len tokens: the first ceil(prompt_len / page_size)."""
    n = pages_for(prompt_len, page_size)
    if n > len(pages):
        raise PageCountMismatch(f"a prompt of {prompt_len} tokens needs {n} pages of {page_size} tokens, "
                                f"but the request holds {len(pages)}")
    return list(pages[:n])


def transfer_pages(req: Any, page_size: int, skip: int = 0) -> list[int]:
    """The pages of a request that move between the servers: its prompt's after the first `skip` (those
    the decode server's prefix cache already holds), on either side (invariant 6); never what the
    prefill side holds past the prompt (the sampled token's page, the drafts' slots)."""
    pages = prompt_pages(req.pages, len(req.prompt_ids), page_size)
    if not 0 <= skip < len(pages):
        raise PageCountMismatch(f"the decode server skips {skip} of the prompt's {len(pages)} pages (at least "
                                f"the last must move)")
    return pages[skip:]


def page_runs(src: Sequence[int], dst: Sequence[int]) -> list[PageRun]:
    """Group (src[i], dst[i]) pairs into runs that are contiguous on both sides. An empty side is nothing
    to transfer; lists of different lengths raise PageCountMismatch naming both lengths."""
    if not src or not dst:
        return []
    if len(src) != len(dst):
        raise PageCountMismatch(f"the source has {len(src)} pages but the destination has {len(dst)}: both sides "
                                f"must enumerate pages over the prompt length")
    runs: list[PageRun] = []
    start = 0
    for i in range(1, len(src) + 1):
        if i == len(src) or src[i] != src[i - 1] + 1 or dst[i] != dst[i - 1] + 1:
            runs.append(PageRun(src[start], dst[start], i - start))
            start = i
    return runs
