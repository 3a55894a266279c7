"""Exact top-k cache slots for few long rows, each row spread over many programs (decode at long context).

The one-program row kernel (topk.py) searches a row's k-th largest key in 16 dependent block-wide passes on
one SM, and torch.topk takes about 25 launches: ~60 us per 32K-context row on an H200, more than all of a
`--tp 8` rank's other kernels of a layer at batch 1. Here four launches share the work:

1. `_histogram_kernel` (rows x chunks of CHUNK keys) counts each row's keys by their top BIN_BITS bits (the
   order-preserving uint32 keys of topk._order_keys) into HIST_COPIES histograms per row with global atomics.
   The histograms live across calls (`_histograms`) and are zero between them: step 4 clears what it used.
2. `_count_kernel` (rows x chunks): each program finds the row's threshold bin b (the highest bin with at
   least k keys in it or above) and counts its chunk's keys above b and in b.
3. `_place_kernel` (rows x chunks): each program stores its keys above b as slots (every one is selected)
   after the earlier chunks' ones, and its keys in b as candidates after the earlier chunks' candidates.
4. `_rank_kernel` (rows x blocks of candidates): each candidate's rank among the row's candidates (larger
   keys, then equal keys at lower positions, come first); ranks below k - (keys above b) take the row's
   remaining slots in rank order. Past CAP candidates (many equal keys) one program per row selects by
   two-bit passes over the low 32 - BIN_BITS bits instead. Then the row's histograms are cleared.

The selected set is topk.py's: torch.topk's up to the choice among equal values (ties go to the lowest
positions; NaN ranks above everything). Within a row the slots come as [keys above b, position order]
[selected candidates, rank order]: deterministic for the row's logits, whatever the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.triton._common import new_empty, next_pow2, pdl, pdl_start, stream_scratch
from dsaserve.ops.triton.topk import _order_keys, position_slots, selection_inputs

Tensor = torch.Tensor

BIN_BITS = 12  # 4096 bins: a bin is 1/8 of a binade, so few keys share the threshold's (even: 2 bits per pass)
CHUNK = 1024  # keys per program in steps 1-3
COUNT_BLOCK = 64  # earlier chunks' counts a placing program sums per step (one step up to 64K keys)
HIST_COPIES = 4  # histograms per row, chunks spread over them: fewer atomics meet on one bin (at one 64K-key row
# 25.0 -> 20.1 us against one copy; the scan then sums 4 copies)
CAP = 4096  # candidates ranked by comparison (RANK_BLOCK per program, RANK_SWEEP at a time); past CAP by passes
RANK_BLOCK = 32  # candidates per ranking program; 16 up to FEW_ROWS rows (more programs where few rows leave SMs idle:
FEW_ROWS = 8  # 20.1 -> 17.8 us at one 64K-key row, 30.9 -> 27.6 at 8; slower from 32 rows)
RANK_SWEEP = 256
PASS_CHUNK = 1024  # candidates per step of the passes past CAP
MAX_ROWS = 64  # rows per call (the persistent histograms: 4 MiB per stream)
# Where this path is taken (`fits`): rows of at least 8192 keys, at most MOST_ROWS of them by key width (H200,
# CUDA graphs of back-to-back calls, docs/benchmarks.md: at one row 14.0 / 14.5 / 17.7 us at 8K / 16K / 64K
# keys against the row kernel's 19.3 / 38.2 and torch.topk's 53.9 at 64K; 65.9 against 78.2 at 32 x 64K;
# slower than the row kernel at 32 x 8K (22.8 against 19.5) and 64 x 16K (44.4 against 38.7)).
MOST_ROWS: dict[int, int] = {8192: 16, 16384: 32, 32768: 32}  # wider: as the widest
_FIELD = 21  # the passes of step 4 count three thresholds in one int64 sum, 21 bits each: rows of < 2**21 keys


def _histograms(device: torch.device) -> Tensor:
    """Per-row key histograms of the current stream, all 0 between calls (each call's step 4 clears the rows
    it used)."""
    return stream_scratch("top-k histograms", (MAX_ROWS, HIST_COPIES << BIN_BITS), device)


@triton.jit(do_not_specialize=["stride_x", "stride_len", "L"])
def _histogram_kernel(X, LEN, HIST, stride_x, stride_len, L, K: tl.constexpr, CHUNK: tl.constexpr,
                      BIN_BITS: tl.constexpr, COPIES: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * CHUNK
    kv_len = tl.minimum(tl.load(LEN + t * stride_len), L)
    if (kv_len > K) & (start < kv_len):
        pos = start + tl.arange(0, CHUNK)
        live = pos < kv_len
        key = _order_keys(tl.load(X + t * stride_x + pos, mask=live, other=0.0))
        bins = (key >> (32 - BIN_BITS)).to(tl.int32)
        copy = tl.program_id(1) % COPIES  # chunks spread over copies: fewer atomics meet on one address
        tl.atomic_add(HIST + (t * COPIES + copy) * (1 << BIN_BITS) + bins, 1, mask=live, sem="relaxed")


@triton.jit
def _threshold_bin(HIST, t, K: tl.constexpr, BIN_BITS: tl.constexpr, COPIES: tl.constexpr):
    """(b, keys above bin b, keys in bin b) of row t: b is the highest bin with at least K keys at or above."""
    bins = tl.arange(0, 1 << BIN_BITS)
    h = tl.load(HIST + t * (COPIES << BIN_BITS) + bins)
    for c in tl.static_range(1, COPIES):  # one copy at a time: 4096 counts in registers, not 4 x 4096
        h += tl.load(HIST + (t * COPIES + c) * (1 << BIN_BITS) + bins)
    at_or_above = tl.sum(h, 0) - tl.cumsum(h, 0) + h
    b = tl.max(tl.where(at_or_above >= K, bins, -1), 0)
    in_b = tl.sum(tl.where(bins == b, h, 0), 0)
    return b, tl.sum(tl.where(bins == b, at_or_above, 0), 0) - in_b, in_b


@triton.jit(do_not_specialize=["stride_x", "stride_len", "L"])
def _count_kernel(X, LEN, HIST, COUNTS, STATE, stride_x, stride_len, L, K: tl.constexpr, CHUNK: tl.constexpr,
                  BIN_BITS: tl.constexpr, COPIES: tl.constexpr, PDL: tl.constexpr):
    """Per chunk: its keys above the threshold bin and in it (COUNTS[t, chunk]); chunk 0 stores the row's
    (b, keys above b, keys in b) in STATE."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    start = chunk * CHUNK
    kv_len = tl.minimum(tl.load(LEN + t * stride_len), L)
    if (kv_len > K) & (start < kv_len):
        b, above, in_b = _threshold_bin(HIST, t, K, BIN_BITS, COPIES)
        pos = start + tl.arange(0, CHUNK)
        live = pos < kv_len
        kb = _order_keys(tl.load(X + t * stride_x + pos, mask=live, other=0.0)) >> (32 - BIN_BITS)
        b_u = b.to(tl.uint32)
        two = tl.arange(0, 2)
        counts = tl.where(two == 0, tl.sum((live & (kb > b_u)).to(tl.int32), 0),
                          tl.sum((live & (kb == b_u)).to(tl.int32), 0))
        tl.store(COUNTS + (t * tl.num_programs(1) + chunk) * 2 + two, counts)
        if chunk == 0:
            four = tl.arange(0, 4)
            tl.store(STATE + t * 4 + four, tl.where(four == 0, b, tl.where(four == 1, above, in_b)))


@triton.jit(do_not_specialize=["stride_x", "stride_len", "stride_pt", "stride_o", "stride_c", "L"])
def _place_kernel(X, LEN, PT, REQ, OUT, COUNTS, STATE, CAND_POS, CAND_KEY, stride_x, stride_len, stride_pt,
                  stride_o, stride_c, L, page_size, K: tl.constexpr, KB: tl.constexpr, CHUNK: tl.constexpr,
                  COUNT_BLOCK: tl.constexpr, BIN_BITS: tl.constexpr, PDL: tl.constexpr):
    """Per chunk: its keys above b as slots after the earlier chunks' (every one is selected), its keys in b as
    candidates (position and key) after the earlier chunks' candidates."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    start = chunk * CHUNK
    kv_len = tl.minimum(tl.load(LEN + t * stride_len), L)
    pt_row = PT + tl.load(REQ + t).to(tl.int64) * stride_pt
    out_row = OUT + t * stride_o
    if kv_len <= K:
        if chunk == 0:  # at most K keys: all of them, first to last, then -1
            j = tl.arange(0, KB)
            tl.store(out_row + j, position_slots(pt_row, j, page_size, j < kv_len), mask=j < K)
    elif start < kv_len:
        b_u = tl.load(STATE + t * 4).to(tl.uint32)
        above_before = tl.zeros([], tl.int32)
        in_before = tl.zeros([], tl.int32)
        for c in range(0, chunk, COUNT_BLOCK):  # the earlier chunks' counts
            earlier = c + tl.arange(0, COUNT_BLOCK)
            row_counts = COUNTS + (t * tl.num_programs(1) + earlier) * 2
            above_before += tl.sum(tl.load(row_counts, mask=earlier < chunk, other=0), 0)
            in_before += tl.sum(tl.load(row_counts + 1, mask=earlier < chunk, other=0), 0)
        pos = start + tl.arange(0, CHUNK)
        live = pos < kv_len
        key = _order_keys(tl.load(X + t * stride_x + pos, mask=live, other=0.0))
        kb = key >> (32 - BIN_BITS)
        is_above = live & (kb > b_u)
        is_in = live & (kb == b_u)
        both = is_above.to(tl.int32) + (is_in.to(tl.int32) << 16)  # one scan counts both (CHUNK < 2**15)
        before = tl.cumsum(both, 0) - both
        tl.store(out_row + above_before + (before & 0xFFFF), position_slots(pt_row, pos, page_size, is_above),
                 mask=is_above)
        dest = t * stride_c + in_before + (before >> 16)
        tl.store(CAND_POS + dest, pos, mask=is_in)
        tl.store(CAND_KEY + dest, key.to(tl.int32, bitcast=True), mask=is_in)


@triton.jit
def _counts_at_or_above(key, c1, c2, c3, FIELD: tl.constexpr):
    """Per key, whether it is >= c1, c2, c3, packed in one int64 (FIELD bits each) so one sum counts all three."""
    one = tl.full(key.shape, 1, tl.int64)
    return (tl.where(key >= c1, one, 0) + tl.where(key >= c2, one << FIELD, 0)
            + tl.where(key >= c3, one << (2 * FIELD), 0))


@triton.jit
def _candidate_keys(CAND_KEY, base, s, count, CAP: tl.constexpr):
    i = s + tl.arange(0, CAP)
    return tl.load(CAND_KEY + base + i, mask=i < count, other=0).to(tl.uint32, bitcast=True)  # padding: 0


@triton.jit
def _select_by_passes(CAND_POS, CAND_KEY, base, count, need, v, out_row, pt_row, page_size, CHUNK: tl.constexpr,
                      BIN_BITS: tl.constexpr, FIELD: tl.constexpr):
    """More candidates than the ranking takes (many equal keys): the need-th largest candidate key by two bits
    per pass over the low bits (v holds the top ones), then the candidates above it and its ties lowest
    position first, in position order. Each pass reads the candidates in chunks of CHUNK (a rare path: few
    registers, so that the ranking beside it in the kernel keeps its occupancy)."""
    mask = (1 << FIELD) - 1
    for s in tl.static_range((32 - BIN_BITS) // 2 - 1, -1, -1):
        step = tl.full([], 1, tl.uint32) << (2 * s)
        c1, c2, c3 = v | step, v | (2 * step), v | (3 * step)
        acc = tl.zeros([CHUNK], tl.int64)
        for r in range(0, count, CHUNK):
            acc += _counts_at_or_above(_candidate_keys(CAND_KEY, base, r, count, CHUNK), c1, c2, c3, FIELD)
        n = tl.sum(acc, 0)
        v = tl.where((n >> (2 * FIELD)) >= need, c3,
                     tl.where(((n >> FIELD) & mask) >= need, c2, tl.where((n & mask) >= need, c1, v)))
    gt_all = tl.zeros([], tl.int32)
    for r in range(0, count, CHUNK):
        gt_all += tl.sum((_candidate_keys(CAND_KEY, base, r, count, CHUNK) > v).to(tl.int32), 0)
    ties = need - gt_all
    gt_before = tl.zeros([], tl.int32)
    eq_before = tl.zeros([], tl.int32)
    for r in range(0, count, CHUNK):
        key = _candidate_keys(CAND_KEY, base, r, count, CHUNK)
        i = r + tl.arange(0, CHUNK)
        gt = key > v
        eq = (key == v) & (i < count)
        both = gt.to(tl.int32) + (eq.to(tl.int32) << 16)  # CHUNK < 2**15
        before = tl.cumsum(both, 0) - both
        eq_rank = eq_before + (before >> 16)
        sel = gt | (eq & (eq_rank < ties))
        pos = tl.load(CAND_POS + base + i, mask=sel, other=0)
        tl.store(out_row + gt_before + (before & 0xFFFF) + tl.minimum(eq_rank, ties),
                 position_slots(pt_row, pos, page_size, sel), mask=sel)
        gt_before += tl.sum(gt.to(tl.int32), 0)
        eq_before += tl.sum(eq.to(tl.int32), 0)


@triton.jit(do_not_specialize=["stride_len", "stride_pt", "stride_o", "stride_c", "L"])
def _rank_kernel(CAND_POS, CAND_KEY, LEN, PT, REQ, HIST, OUT, STATE, stride_len, stride_pt, stride_o, stride_c,
                 L, page_size, K: tl.constexpr, CAP: tl.constexpr, RB: tl.constexpr, JB: tl.constexpr,
                 PASS_CHUNK: tl.constexpr,
                 BIN_BITS: tl.constexpr, COPIES: tl.constexpr, FIELD: tl.constexpr, PDL: tl.constexpr):
    """Per block of RB candidates: each one's rank among the row's candidates (larger keys, then equal keys at
    lower positions, before it); ranks below need take slot `above + rank`. Past CAP candidates block 0
    selects alone by passes. Block 0 then clears the row's histogram."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    kv_len = tl.minimum(tl.load(LEN + t * stride_len), L)
    if kv_len > K:
        b = tl.load(STATE + t * 4)
        above = tl.load(STATE + t * 4 + 1)
        count = tl.load(STATE + t * 4 + 2)
        need = K - above  # 1 <= need <= count
        base = t * stride_c
        pt_row = PT + tl.load(REQ + t).to(tl.int64) * stride_pt
        out_row = OUT + t * stride_o + above
        if count <= CAP:
            if blk * RB < count:
                i = blk * RB + tl.arange(0, RB)
                ki = tl.load(CAND_KEY + base + i, mask=i < count, other=0).to(tl.uint32, bitcast=True)
                rank = tl.zeros([RB], tl.int32)
                for s in range(0, count, JB):
                    j = s + tl.arange(0, JB)
                    kj = tl.load(CAND_KEY + base + j, mask=j < count, other=0).to(tl.uint32, bitcast=True)
                    before = (kj[None, :] > ki[:, None]) | ((kj[None, :] == ki[:, None]) & (j[None, :] < i[:, None]))
                    rank += tl.sum((before & (j[None, :] < count)).to(tl.int32), 1)
                sel = (i < count) & (rank < need)
                pos = tl.load(CAND_POS + base + i, mask=sel, other=0)
                tl.store(out_row + rank, position_slots(pt_row, pos, page_size, sel), mask=sel)
        elif blk == 0:
            _select_by_passes(CAND_POS, CAND_KEY, base, count, need, b.to(tl.uint32) << (32 - BIN_BITS), out_row,
                              pt_row, page_size, PASS_CHUNK, BIN_BITS, FIELD)
        if blk == 0:
            tl.store(HIST + t * (COPIES << BIN_BITS) + tl.arange(0, COPIES << BIN_BITS), 0)


def fits(rows: int, num_keys: int) -> bool:
    """Whether this path selects faster than the others for `rows` rows of `num_keys` logits."""
    if num_keys < min(MOST_ROWS) or num_keys >= 1 << _FIELD:
        return False
    return rows <= MOST_ROWS[min(next_pow2(num_keys), max(MOST_ROWS))]


def split_topk_slots(logits: Tensor, row_kv_len: Tensor, page_table: Tensor, row_req: Tensor, page_size: int,
                     topk: int) -> Tensor:
    """See reference.topk_slots; logits [T, L] fp32, T <= MAX_ROWS, L < 2**21 (positions >= kv_len ignored)."""
    T, L = logits.shape
    if T > MAX_ROWS or L >= 1 << _FIELD:
        raise ValueError(f"split_topk_slots takes at most {MAX_ROWS} rows of < {1 << _FIELD} logits, got {T} x {L}")
    out, row_kv_len, page_table, row_req = selection_inputs("split_topk_slots", logits, row_kv_len, page_table,
                                                            row_req, topk)
    if T == 0 or topk == 0:
        return out
    hist = _histograms(logits.device)
    chunks, warps = triton.cdiv(L, CHUNK), max(4, CHUNK // 256)
    cand_pos = new_empty((T, L), torch.int32, logits.device)
    cand_key = new_empty((T, L), torch.int32, logits.device)
    counts = new_empty((T, chunks, 2), torch.int32, logits.device)
    state = new_empty((T, 4), torch.int32, logits.device)
    launch = pdl(logits)
    _histogram_kernel[(T, chunks)](logits, row_kv_len, hist, logits.stride(0), row_kv_len.stride(0), L, K=topk,
                                   CHUNK=CHUNK, BIN_BITS=BIN_BITS, COPIES=HIST_COPIES, num_warps=warps, **launch)
    _count_kernel[(T, chunks)](logits, row_kv_len, hist, counts, state, logits.stride(0), row_kv_len.stride(0), L,
                               K=topk, CHUNK=CHUNK, BIN_BITS=BIN_BITS, COPIES=HIST_COPIES, num_warps=warps, **launch)
    _place_kernel[(T, chunks)](logits, row_kv_len, page_table, row_req, out, counts, state, cand_pos, cand_key,
                               logits.stride(0), row_kv_len.stride(0), page_table.stride(0), out.stride(0),
                               cand_pos.stride(0), L, page_size, K=topk, KB=next_pow2(topk), CHUNK=CHUNK,
                               COUNT_BLOCK=COUNT_BLOCK, BIN_BITS=BIN_BITS, num_warps=warps, **launch)
    rank_block = RANK_BLOCK // 2 if T <= FEW_ROWS else RANK_BLOCK
    _rank_kernel[(T, CAP // rank_block)](cand_pos, cand_key, row_kv_len, page_table, row_req, hist, out, state,
                                         row_kv_len.stride(0), page_table.stride(0), out.stride(0), cand_pos.stride(0),
                                         L, page_size, K=topk, CAP=CAP, RB=rank_block, JB=RANK_SWEEP,
                                         PASS_CHUNK=PASS_CHUNK,
                                         BIN_BITS=BIN_BITS, COPIES=HIST_COPIES, FIELD=_FIELD, num_warps=4,
                                         **launch)
    return out


__all__ = ["CAP", "CHUNK", "MAX_ROWS", "fits", "split_topk_slots"]
