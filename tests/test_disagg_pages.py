"""Invariant 6: prefill and decode enumerate a request's pages over the prompt length, and the one page-run
helper groups them, rejects lists of different lengths naming both, and treats an empty side as nothing."""
from __future__ import annotations

import pytest

from dsaserve.cache.pages import PageAllocator
from dsaserve.disagg.pages import PageCountMismatch, PageRun, page_runs, prompt_pages, transfer_pages
from dsaserve.engine.request import Request, SamplingParams
from dsaserve.engine.scheduler import Scheduler, SchedulerConfig


def test_runs_contiguous_and_broken() -> None:
    assert page_runs([3, 4, 5], [10, 11, 12]) == [PageRun(3, 10, 3)]
    # broken on the source side, then on the destination side
    assert page_runs([3, 4, 9, 10], [1, 2, 3, 4]) == [PageRun(3, 1, 2), PageRun(9, 3, 2)]
    assert page_runs([3, 4, 5, 6], [1, 2, 7, 8]) == [PageRun(3, 1, 2), PageRun(5, 7, 2)]
    assert page_runs([5, 4], [1, 2]) == [PageRun(5, 1, 1), PageRun(4, 2, 1)]  # descending is not a run
    assert page_runs([7, 1, 2, 3], [4, 5, 6, 9]) == [PageRun(7, 4, 1), PageRun(1, 5, 2), PageRun(3, 9, 1)]


def test_freed_pages_come_back_as_runs() -> None:
    """After requests come and go, a freed request's pages are handed out again in their order, so the next
    prompt's pages form runs on both sides of a transfer (reversed, each page would be a descriptor of its own)."""
    prefill, decode = PageAllocator(40), PageAllocator(40)
    a, b = prefill.alloc(6), prefill.alloc(4)
    decode.alloc(5)
    d = decode.alloc(6)
    prefill.free(a)
    decode.free(d)
    src, dst = prefill.alloc(6), decode.alloc(6)
    assert src == a and dst == d
    assert page_runs(src, dst) == [PageRun(a[0], d[0], 6)]
    shared = prefill.alloc(3)
    prefill.share(shared)
    prefill.free(shared + b)  # the shared pages stay held: only b is released, in order
    assert prefill.alloc(4) == b


def test_empty_sides_are_nothing_to_transfer() -> None:
    assert page_runs([], []) == []
    assert page_runs([1, 2], []) == []
    assert page_runs([], [1, 2]) == []


def test_unequal_lengths_name_both() -> None:
    with pytest.raises(PageCountMismatch, match=r"source has 3 pages but the destination has 2"):
        page_runs([1, 2, 3], [4, 5])


def _prefilled(spec_steps: int, prompt_len: int, page_size: int) -> tuple[Request, Request]:
    """A prompt prefilled by a real scheduler (its first token sampled and its next step planned, which opens
    the sampled token's page), and the same prompt pre-allocated by a real decode scheduler."""
    cfg = SchedulerConfig(page_size=page_size, chunked_prefill_size=1024, max_running_requests=8,
                          max_queued_requests=8, context_length=1024, spec_steps=spec_steps)
    sides = []
    for _ in range(2):
        sides.append((Scheduler(cfg, PageAllocator(64)), Request("r", list(range(5, 5 + prompt_len)),
                                                                 SamplingParams(), 8, 0, 0)))
    (pre, src), (dec, dst) = sides
    pre.add(src)
    plan = pre.schedule()
    pre.advance(plan, {"r": src})
    src.output_ids.append(7)  # the sampled token: position prompt_len, on a new page at a page boundary
    src.draft_ids = [1] * spec_steps
    assert pre.schedule() is not None  # its next step allocates the page the sampled token opened
    assert dec.preallocate(dst, prompt_len)
    return src, dst


@pytest.mark.parametrize("spec_steps", [0, 3])
@pytest.mark.parametrize("page_size", [1, 4])
def test_sampled_token_opening_a_page_cannot_skew_the_lists(spec_steps: int, page_size: int) -> None:
    prompt_len = 8  # ends exactly at a page boundary: the sampled token (and the drafts' slots) open a new page
    src, dst = _prefilled(spec_steps, prompt_len, page_size)
    over_tokens = prompt_pages(src.pages, prompt_len + 1, page_size)  # the reported crash: prompt + sampled token
    decode_side = prompt_pages(dst.pages, prompt_len, page_size)
    assert len(over_tokens) == len(decode_side) + 1
    with pytest.raises(PageCountMismatch, match=rf"source has {len(decode_side) + 1} pages but the destination "
                                                 rf"has {len(decode_side)}"):
        page_runs(over_tokens, decode_side)
    # both servers enumerate with transfer_pages (over the prompt length): the lists match whatever the
    # prefill side holds beyond the prompt
    assert len(src.pages) > len(decode_side)
    src_pages, dst_pages = transfer_pages(src, page_size), transfer_pages(dst, page_size)
    runs = page_runs(src_pages, dst_pages)
    assert sum(r.length for r in runs) == prompt_len // page_size == len(dst.pages) == len(src_pages)


def test_prompt_pages_refuses_too_few() -> None:
    with pytest.raises(PageCountMismatch, match="needs 3 pages of 4 tokens, but the request holds 2"):
        prompt_pages([1, 2], 9, 4)


def test_transfer_pages_skip_the_decode_servers_cached_prefix() -> None:
    req = Request("r", list(range(5, 15)), SamplingParams(), 8, 0, 0)  # 10 tokens: 3 pages of 4
    req.pages = [7, 8, 9, 12]  # the prefill side may hold more than the prompt's pages
    assert transfer_pages(req, 4) == [7, 8, 9] and transfer_pages(req, 4, skip=2) == [9]
    with pytest.raises(PageCountMismatch, match="skips 3 of the prompt's 3 pages"):
        transfer_pages(req, 4, skip=3)
