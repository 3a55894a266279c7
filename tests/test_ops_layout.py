"""Invariants at the op and layout level: top-k shape, chunking, head padding, checked-mode errors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dsaserve.cache.pages import OutOfPages, PageAllocator
from dsaserve.engine.layout import BatchLayout, LayoutError, StepMode, StepPlan
from dsaserve.ops import reference
from dsaserve.ops.dispatch import DSAOps


def _layout(prefix: list[int], q: list[int], page_size: int, key_width: int | None = None) -> BatchLayout:
    pages, next_page = [], 1
    for p, n in zip(prefix, q):
        count = -(-(p + n) // page_size)
        pages.append(tuple(range(next_page, next_page + count)))
        next_page += count
    plan = StepPlan(StepMode.EXTEND, tuple(f"r{i}" for i in range(len(q))), tuple(pages), tuple(prefix), tuple(q),
                    tuple(1 for _ in q), tuple(True for _ in q), tuple([1] * sum(q)), tuple(0 for _ in q))
    return BatchLayout.build(plan, page_size, torch.device("cpu"), key_width=key_width)


def _indexer_inputs(layout: BatchLayout, slots: int, heads: int = 8, dim: int = 16):
    gen = torch.Generator().manual_seed(0)
    T = layout.num_tokens
    return (torch.randn(T, heads, dim, generator=gen), torch.rand(T, heads, generator=gen),
            torch.randn(slots, dim, generator=gen))


@pytest.mark.parametrize("page_size", [1, 4])
def test_topk_rows_hold_min_kvlen_topk_valid_then_minus_one(page_size: int) -> None:
    layout = _layout([0, 30, 3], [5, 1, 12], page_size)
    q, w, k = _indexer_inputs(layout, 64 * page_size + 64)
    out = DSAOps().indexer_topk(q, w, k, layout, topk=8)
    kv = layout.row_kv_len[:, 0]
    for t in range(layout.num_tokens):
        valid = min(int(kv[t]), 8)
        assert (out[t, :valid] >= 0).all() and (out[t, valid:] == -1).all()
        assert len(set(out[t, :valid].tolist())) == valid


@pytest.mark.parametrize("topk", [8, 20])
def test_indexer_chunking_matches_unchunked(topk: int) -> None:
    """Chunks of rows, each scored only as wide as its rows see (at topk 20 the first chunk's rows see at most
    16 keys and select without logits), select what one whole-width chunk does."""
    layout = _layout([0, 50, 7], [40, 1, 9], 4)
    q, w, k = _indexer_inputs(layout, 4 * 64)
    whole = DSAOps().indexer_topk(q, w, k, layout, topk=topk)
    # a 3-row budget: chunks of 16 rows (the least, so that chunk starts stay 16-byte aligned): 16, 16, 16, 2
    assert [layout.keys_of_rows(s, s + 16) for s in (0, 16, 32, 48)] == [16, 32, 51, 16]
    chunked = DSAOps(max_logits_bytes=3 * layout.key_width * 4).indexer_topk(q, w, k, layout, topk=topk)
    assert torch.equal(whole.sort(-1).values, chunked.sort(-1).values)


def test_head_padding_matches_unpadded() -> None:
    gen = torch.Generator().manual_seed(1)
    q, cache = torch.randn(6, 5, 24, generator=gen), torch.randn(40, 24, generator=gen)
    idx = torch.randint(0, 40, (6, 7), generator=gen, dtype=torch.int32)
    idx[2, 3:] = -1
    plain = DSAOps().sparse_mla(q, cache, idx, 0.3, 16)
    padded = DSAOps(head_multiple=64).sparse_mla(q, cache, idx, 0.3, 16)
    assert padded.shape == plain.shape and torch.allclose(plain, padded, atol=1e-6)


def test_query_rows_in_pieces_match_one_call() -> None:
    """A kernel that takes few query rows per call (FlashMLA's FP8 decode kernel: 8,192) gets the rows in pieces
    written into one output; with head padding and per-row lengths, equal to one call."""
    gen = torch.Generator().manual_seed(3)
    q, cache = torch.randn(7, 5, 24, generator=gen), torch.randn(40, 24, generator=gen)
    idx = torch.randint(0, 40, (7, 6), generator=gen, dtype=torch.int32)
    lengths = torch.tensor([[6], [2], [0], [6], [5], [1], [3]], dtype=torch.int32)
    whole = DSAOps().sparse_mla_rows(q, cache, idx, 0.3, 16, lengths)
    pieces = DSAOps(head_multiple=8, max_query_rows=3).sparse_mla_rows(q, cache, idx, 0.3, 16, lengths)
    assert pieces.shape == whole.shape == (7, 5, 16) and torch.allclose(whole, pieces, atol=1e-6)
    assert not torch.equal(whole[1], whole[0])  # rows differ: a piece written to the wrong rows would show


def test_sparse_mla_equals_dense_softmax() -> None:
    gen = torch.Generator().manual_seed(2)
    q, cache = torch.randn(3, 4, 12, generator=gen), torch.randn(20, 12, generator=gen)
    idx = torch.tensor([[0, 5, 9, -1], [3, -1, -1, -1], [-1, -1, -1, -1]], dtype=torch.int32)
    out, lse = reference.sparse_mla(q, cache, idx, 0.5, 8)
    for t in range(2):
        sel = idx[t][idx[t] >= 0].long()
        probs = torch.softmax(q[t] @ cache[sel].T * 0.5, -1)
        assert torch.allclose(out[t], probs @ cache[sel, :8], atol=1e-6)
    assert (out[2] == 0).all() and torch.isinf(lse[2]).all()  # a row with no keys


def test_sparse_mla_lengths_bound_the_read_slots() -> None:
    """`lengths` reads a row's first lengths[t] indices only: equal to the same indices cut to -1 there;
    checked mode refuses a layout whose rows select slots past their keys (the kernels would skip them)."""
    gen = torch.Generator().manual_seed(3)
    q, cache = torch.randn(3, 4, 12, generator=gen), torch.randn(20, 12, generator=gen)
    idx = torch.tensor([[0, 5, 9, 2], [3, 7, 1, 4], [6, 8, 10, 11]], dtype=torch.int32)
    lengths = torch.tensor([[2], [4], [0]], dtype=torch.int32)
    cut = torch.where(torch.arange(4)[None, :] < lengths, idx, -1)
    out, lse = reference.sparse_mla(q, cache, idx, 0.5, 8, lengths)
    want, want_lse = reference.sparse_mla(q, cache, cut, 0.5, 8)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    layout = _layout([0, 1], [2, 1], 4)  # rows see 1, 2 and 2 keys
    rows = torch.tensor([[3, -1], [3, 4], [5, 9]], dtype=torch.int32)
    DSAOps().sparse_mla(torch.randn(3, 2, 12), torch.randn(32, 12), rows, 0.5, 8, layout)
    rows[0, 1] = 7
    with pytest.raises(LayoutError, match="top-k row 0 selects a slot past its 1 keys"):
        DSAOps().sparse_mla(torch.randn(3, 2, 12), torch.randn(32, 12), rows, 0.5, 8, layout)


def test_checked_mode_rejects_row_mismatch_before_kernel() -> None:
    layout = _layout([0], [6], 4)
    q, cache = torch.randn(9, 2, 12), torch.randn(32, 12)
    idx = torch.zeros(9, 4, dtype=torch.int32)
    with pytest.raises(LayoutError, match="query has 9 rows but the layout describes 6 query rows"):
        DSAOps().sparse_mla(q, cache, idx, 0.5, 8, layout)


def test_validate_names_the_broken_field() -> None:
    layout = _layout([2, 0], [3, 4], 4)
    bad = dataclasses.replace(layout, row_kv_len=layout.row_kv_len[:, 0])
    with pytest.raises(LayoutError, match=r"row_kv_len must be \[num_tokens, 1\]"):
        bad.validate()
    with pytest.raises(LayoutError, match="out_slots reach"):
        layout.validate(num_slots=8)


def test_page_allocator_refcounts() -> None:
    alloc = PageAllocator(5)
    a = alloc.alloc(3)
    assert 0 not in a and alloc.num_free == 1
    alloc.share(a[:1])
    alloc.free(a)
    assert alloc.num_free == 3  # the shared page is still held once
    alloc.free(a[:1])
    assert alloc.num_free == 4
    with pytest.raises(OutOfPages):
        alloc.alloc(5)
    b = alloc.alloc(2)
    with pytest.raises(AssertionError, match="freed twice"):
        alloc.free([b[1], b[1]])  # a double free: the page released before it still returns
    assert alloc.num_free == 3 and alloc.alloc(1) == [b[1]]


def test_request_token_slice_equals_concatenation() -> None:
    from dsaserve.engine.request import Request, SamplingParams
    req = Request("r", [11, 12, 13], SamplingParams(), 5, 0, 0, output_ids=[14, 15])
    full = req.prompt_ids + req.output_ids
    for start in range(len(full) + 1):
        for end in range(start, len(full) + 1):
            assert req.token_slice(start, end) == full[start:end], (start, end)


def test_packed_layout_views_one_buffer_and_copies_in_one() -> None:
    """build() packs every tensor field into one buffer (one upload per step); a graph's static copy
    (cloned) takes a layout of the same shape in one copy and then equals it field by field; a layout
    whose logit rows were replaced is copied field by field. (Graphs' layouts: a bucketed key width.)"""
    a, b = _layout([0, 30, 3], [5, 1, 12], 4, 32), _layout([2, 30, 1], [5, 1, 12], 4, 32)
    assert a.static_key() == b.static_key()
    base, end = a.storage.data_ptr(), a.storage.data_ptr() + a.storage.numel() * 4
    assert all(base <= getattr(a, n).data_ptr() < end for n in a.tensor_fields() if getattr(a, n).numel())
    assert all((getattr(a, n).data_ptr() - base) % 16 == 0 for n in a.tensor_fields())  # aligned for Triton
    assert any(not torch.equal(getattr(a, n), getattr(b, n)) for n in a.tensor_fields())  # the copy shows
    static = a.cloned()
    assert static.storage.data_ptr() != a.storage.data_ptr()
    static.copy_from(b)
    fresh = _layout([0, 30, 3], [5, 1, 12], 4, 32)
    for name in b.tensor_fields():
        assert torch.equal(getattr(static, name), getattr(b, name)), name
        assert torch.equal(getattr(a, name), getattr(fresh, name)), name  # the clone shares no memory with a
    rows = torch.tensor([0, 6, 17], dtype=torch.int32)
    moved = b.with_logit_rows(rows)
    assert moved.storage is None
    static.copy_from(moved)
    assert torch.equal(static.logit_rows, rows) and torch.equal(static.row_pos, b.row_pos)


def test_build_matches_the_per_row_definition() -> None:
    """Ragged rows (cached prefixes, a decode row, zero to all logit rows, a dummy on page 0): every field
    equals its definition written row by row, and a request short of pages is refused by name."""
    page_size = 4
    prefix, q, logits = [0, 9, 5, 0], [6, 1, 7, 2], [1, 1, 3, 0]
    pages = ((3, 4), (7, 1, 9), (2, 8, 5), (0,))
    plan = StepPlan(StepMode.MIXED, ("a", "b", "c", ""), pages, tuple(prefix), tuple(q), tuple(logits),
                    (True,) * 4, (1,) * sum(q), (0,) * 4)
    layout = BatchLayout.build(plan, page_size, torch.device("cpu"))
    row_req = [b for b in range(4) for _ in range(q[b])]
    row_pos = [prefix[b] + j for b in range(4) for j in range(q[b])]
    ends = [sum(q[:b + 1]) for b in range(4)]
    want = {"row_req": row_req, "row_pos": row_pos, "row_kv_len": [[p + 1] for p in row_pos],
            "out_slots": [pages[b][p // page_size] * page_size + p % page_size for b, p in zip(row_req, row_pos)],
            "logit_rows": [r for b in range(4) for r in range(ends[b] - logits[b], ends[b])],
            "seq_lens": [p + n for p, n in zip(prefix, q)],
            "page_table": [list(p) + [0] * (3 - len(p)) for p in pages]}
    for name, values in want.items():
        assert getattr(layout, name).tolist() == values, name
    short = dataclasses.replace(plan, pages=((3, 4), (7, 1), (2, 8, 5), (0,)))
    with pytest.raises(LayoutError, match="request 'b' has 10 tokens but 2 pages of 4"):
        BatchLayout.build(short, page_size, torch.device("cpu"))


def test_keys_of_rows_is_the_most_any_row_of_a_chunk_sees() -> None:
    """A prefill's indexer scores each chunk of rows only as wide as its rows see: checked against the rows'
    own kv lengths for every chunk of a ragged batch; a graph's layout answers its bucketed key width."""
    layout = _layout([0, 30, 3, 7], [5, 1, 12, 9], 4)
    kv = layout.row_kv_len.flatten().tolist()
    for start in range(layout.num_tokens):
        for stop in range(start + 1, layout.num_tokens + 1):
            assert layout.keys_of_rows(start, stop) == max(kv[start:stop]), (start, stop)
    assert _layout([0, 30], [5, 1], 4, 64).keys_of_rows(0, 1) == 64


@pytest.mark.parametrize("page_size", [1, 4])
def test_shifted_layout_equals_the_layout_built_at_the_shifted_positions(page_size: int) -> None:
    """A draft step is planned at the most a request can have accepted and moved back on the device once
    acceptance is known: every tensor field equals build() of the plan at the moved positions (a graph's padding
    request, shift 0, included); packed as before, so a graph takes it in one copy."""
    prefix, shift = [9, 2, 20, 0], [-3, 0, -1, 0]
    pages = tuple(tuple(range(1 + 8 * b, 1 + 8 * b + -(-(p + 2) // page_size))) for b, p in enumerate(prefix))
    pages = pages[:3] + ((0,),)

    def plan(first: list[int]) -> StepPlan:
        return StepPlan(StepMode.DRAFT, ("a", "b", "c", ""), pages, tuple(first), (1,) * 4, (1,) * 4,
                        (True,) * 4, (), (0,) * 4)

    planned = BatchLayout.build(plan(prefix), page_size, torch.device("cpu"), key_width=32, page_width=24)
    moved = planned.shifted(torch.tensor(shift, dtype=torch.int32))
    want = BatchLayout.build(plan([p + s for p, s in zip(prefix, shift)]), page_size, torch.device("cpu"),
                             key_width=32, page_width=24)
    assert any(not torch.equal(getattr(planned, n), getattr(want, n)) for n in want.tensor_fields())
    for name in want.tensor_fields():
        assert torch.equal(getattr(moved, name), getattr(want, name)), name
    assert moved.static_key() == want.static_key() and moved.storage is not None
    assert torch.equal(planned.row_pos, torch.tensor(prefix, dtype=torch.int32))  # the planned layout is kept


def test_page_ids_follow_the_list_and_a_plans_view_never_changes() -> None:
    """A request's int32 page ids (what a plan holds) equal its page list after every extension, growth past the
    buffer and replacement (a release, a hand-over); every view taken earlier still holds the pages of its time."""
    from dsaserve.engine.request import Request, SamplingParams
    req = Request("r", [1], SamplingParams(), 8, 0, seed=0)
    taken: list[tuple[object, list[int]]] = []
    for step in range(40):
        if step % 13 == 12:
            req.pages = [900 + step]  # replaced, as a release and re-admission do
        else:
            req.pages += list(range(100 * step, 100 * step + step % 5 + 1))
        view = req.page_ids()
        assert view.dtype == np.int32 and view.tolist() == req.pages
        taken.append((view, list(req.pages)))
    assert all(view.tolist() == pages for view, pages in taken)


def test_a_plans_pages_reach_the_group_as_what_changed() -> None:
    """lockstep sends a plan's page ids as each request's pages past those sent before (engine/page_sync.py): over
    steps where requests grow, are replaced (released and re-admitted), skip a step or end, the other rank's pages
    equal the leader's every step, through a pickle; a request seen before sends only its new pages, and a rank
    out of step is refused by name."""
    import pickle
    import random

    from dsaserve.engine.page_sync import PageReceiver, PageSender
    from dsaserve.engine.request import Request, SamplingParams
    rng = random.Random(7)
    requests = {f"r{i}": Request(f"r{i}", [1], SamplingParams(), 8, i, seed=i) for i in range(6)}
    sender, receiver, resent = PageSender(), PageReceiver(), []
    for step in range(60):
        for req in requests.values():
            if rng.random() < 0.05:
                req.pages = [rng.randrange(1, 999)]
            else:
                req.pages += [rng.randrange(1, 999) for _ in range(rng.randrange(3))]
        rids = tuple(rid for rid in requests if rng.random() < 0.8)
        plan = StepPlan(StepMode.DECODE, rids, tuple(requests[r].page_ids() for r in rids), (0,) * len(rids),
                        (1,) * len(rids), (1,) * len(rids), (True,) * len(rids), (), (0,) * len(rids))
        plain, deltas = sender.encode(plan, requests)
        got = receiver.decode(*pickle.loads(pickle.dumps((plain, deltas))))
        assert [p.tolist() for p in got.pages] == [requests[r].pages for r in rids]
        resent += [start for start in deltas.starts]
    assert sum(1 for s in resent if s > 0) > len(resent) // 2  # most requests sent only their new pages
    stale = StepPlan(StepMode.DECODE, ("r0",), (requests["r0"].page_ids(),), (0,), (1,), (1,), (True,), (), (0,))
    leader = PageSender()
    leader.encode(stale, requests)  # a step this receiver never got
    requests["r0"].pages += [5]
    plain, later = leader.encode(dataclasses.replace(stale, pages=(requests["r0"].page_ids(),)), requests)
    assert later.starts[0] > 0
    with pytest.raises(RuntimeError, match="'r0': the leader sent pages from"):
        PageReceiver().decode(plain, later)
    # A new request reusing an ended one's id (its client may, once the final output came), its pages as many or
    # more and its generation the same (generations count per request): all its pages go (the other ranks
    # prepended the ended request's pages: its KV went to pages the prefix cache or other requests held).
    sender, receiver = PageSender(), PageReceiver()
    for pages in ([11, 12, 13], [21, 22, 23, 24, 25]):
        req = Request("same", [1], SamplingParams(), 8, 9, seed=9)
        req.pages = pages
        plan = StepPlan(StepMode.DECODE, ("same",), (req.page_ids(),), (0,), (1,), (1,), (True,), (), (0,))
        assert req.page_mirror.generation == 1
        assert receiver.decode(*sender.encode(plan, {"same": req})).pages[0].tolist() == pages
