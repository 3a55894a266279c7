"""Exact top-k cache slots for many wide rows (prefill chunks at long context, large decode batches there): one
program per row, which reads the row about twice where torch.topk's radix select makes several passes and
about 25 launches.

1. SAMPLE keys spread evenly over the row's kv_len, in registers, give a threshold t: about their r-th largest
   (its top 16 bits), r chosen so that about (k + CAP) / 2 of the row's keys are expected at or above it.
2. One pass over the row, CHUNK keys at a time, writes the positions of its keys >= t in position order to a
   scratch row of CAP entries.
3. If it found between k and CAP of them, they hold the row's k largest (t is at most the k-th largest): their
   keys, read back (the row was just read: L2), select as in topk.py's row kernel (topk.store_largest).
   Otherwise (a sample that missed: many equal keys, an order that defeats the even spread) the row selects
   by two-bit passes over it in memory: slow, exact.
Rows of at most CAP keys skip 1 and 2 (every key is a candidate); rows of at most k keys keep their first kv_len
positions. The selected set and its order are the row kernel's: torch.topk's set up to the choice among equal
values (ties go to the lowest positions; NaN ranks above everything), slots in position order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.triton._common import new_empty, next_pow2, pdl, pdl_start
from dsaserve.ops.triton.topk import (_kth_largest, _order_keys, position_slots, selection_inputs, store_largest,
                                       store_selected)

Tensor = torch.Tensor

KEYS_PER_THREAD = 8  # in a step of a pass over the row
# Registers per thread: 80 fit three 8-warp programs on an SM (k = 2048: 4096-key tensors); more rows in flight
# hide the passes' latency. H200, docs/benchmarks.md: 7-12% faster than 128 (two programs) at 1-4K rows.
MAXNREG = 80
# Sampled keys per row: the count at or above the sample's r-th largest (r ~ (k + CAP) / 2 * SAMPLE / kv_len)
# varies by about 1 / sqrt(r); r >= 64 keeps it within [k, CAP] past 3 sigma. Wider rows take the wider sample
# (at k = 2048, r >= 64 up to 196K keys: past that more rows miss and take the passes).
SAMPLE, WIDE_SAMPLE, WIDE_ROWS = 1024, 4096, 32768


def cap(topk: int) -> int:
    """Candidates a row may keep: twice k, rounded up to a power of two."""
    return 2 * next_pow2(topk)


def fits(topk: int) -> bool:
    """Whether this kernel selects k of a row: its candidates' counts take 16-bit fields (k <= 8192)."""
    return cap(topk) < 1 << 15


def sample_size(topk: int, num_keys: int) -> int:
    return min(cap(topk), WIDE_SAMPLE if num_keys > WIDE_ROWS else SAMPLE)


@triton.jit
def _sample_threshold(x_row, kv_len, K: tl.constexpr, CAP: tl.constexpr, SAMPLE: tl.constexpr):
    """The r-th largest of SAMPLE keys spread evenly over the row (kv_len > CAP >= SAMPLE: distinct positions),
    about (K + CAP) / 2 of the row's keys expected at or above it; its top 16 bits only (a 1/128 binade lower:
    half the passes)."""
    i = tl.arange(0, SAMPLE)
    sample = _order_keys(tl.load(x_row + (i.to(tl.int64) * kv_len) // SAMPLE))
    r = tl.minimum(tl.maximum(((K + CAP) * SAMPLE // 2 // kv_len).to(tl.int32), 1), SAMPLE)
    return _kth_largest(sample, r, 16)


@triton.jit
def _gather_candidates(x_row, cand_row, kv_len, threshold, CAP: tl.constexpr, CHUNK: tl.constexpr):
    """Positions of the keys >= threshold, in position order, into cand_row (the first CAP of them); their count
    (the pass stops once it passes CAP)."""
    n = tl.zeros([], tl.int32)
    start = tl.zeros([], tl.int32)
    while (start < kv_len) & (n <= CAP):
        key, pos = _chunk_keys(x_row, start, kv_len, CHUNK)
        hit = ((pos < kv_len) & (key >= threshold)).to(tl.int32)  # (a threshold of 0 is no padding's)
        dest = n + tl.cumsum(hit, 0) - hit
        tl.store(cand_row + dest, pos, mask=(hit != 0) & (dest < CAP))
        n += tl.sum(hit, 0)
        start += CHUNK
    return n


@triton.jit
def _chunk_keys(x_row, start, kv_len, CHUNK: tl.constexpr):
    pos = start + tl.arange(0, CHUNK)
    live = pos < kv_len
    key = _order_keys(tl.load(x_row + pos, mask=live, other=0.0))
    return tl.where(live, key, tl.zeros_like(key)), pos


@triton.jit
def _select_by_passes(x_row, out_row, pt_row, kv_len, page_size, K: tl.constexpr, CHUNK: tl.constexpr):
    """topk.store_largest over a row in memory: the K-th largest by two bits per pass, then the keys above it
    and its ties lowest position first, in position order."""
    tl.static_assert(CHUNK < 32768)  # the packed scan's 16-bit fields
    v = tl.zeros([], tl.uint32)
    for s in tl.static_range(15, -1, -1):
        step = tl.full([], 1, tl.uint32) << (2 * s)
        c1, c2, c3 = v | step, v | (2 * step), v | (3 * step)
        n1 = tl.zeros([], tl.int32)
        n2 = tl.zeros([], tl.int32)
        n3 = tl.zeros([], tl.int32)
        for start in range(0, kv_len, CHUNK):
            key, _ = _chunk_keys(x_row, start, kv_len, CHUNK)
            n1 += tl.sum((key >= c1).to(tl.int32), 0)
            n2 += tl.sum((key >= c2).to(tl.int32), 0)
            n3 += tl.sum((key >= c3).to(tl.int32), 0)
        v = tl.where(n3 >= K, c3, tl.where(n2 >= K, c2, tl.where(n1 >= K, c1, v)))
    above = tl.zeros([], tl.int32)
    for start in range(0, kv_len, CHUNK):
        key, _ = _chunk_keys(x_row, start, kv_len, CHUNK)
        above += tl.sum((key > v).to(tl.int32), 0)
    need = K - above
    gt_run = tl.zeros([], tl.int32)
    eq_run = tl.zeros([], tl.int32)
    for start in range(0, kv_len, CHUNK):
        key, pos = _chunk_keys(x_row, start, kv_len, CHUNK)
        gt, eq = store_selected(key, pos, v, need, gt_run, eq_run, out_row, pt_row, page_size)
        gt_run += gt
        eq_run += eq


@triton.jit(do_not_specialize=["stride_x", "stride_len", "stride_pt", "stride_o", "stride_c", "L"])
def _sampled_topk_slots_kernel(X, LEN, PT, REQ, OUT, CAND, stride_x, stride_len, stride_pt, stride_o, stride_c, L,
                               page_size, K: tl.constexpr, KB: tl.constexpr, CAP: tl.constexpr,
                               SAMPLE: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    kv_len = tl.minimum(tl.load(LEN + t * stride_len), L)
    x_row = X + t * stride_x
    cand_row = CAND + t * stride_c
    pt_row = PT + tl.load(REQ + t).to(tl.int64) * stride_pt
    out_row = OUT + t * stride_o
    if kv_len <= K:  # at most K keys: all of them, first to last, then -1
        j = tl.arange(0, KB)
        tl.store(out_row + j, position_slots(pt_row, j, page_size, j < kv_len), mask=j < K)
    else:
        count = kv_len  # up to CAP keys: every one is a candidate
        if kv_len > CAP:
            count = _gather_candidates(x_row, cand_row, kv_len, _sample_threshold(x_row, kv_len, K, CAP, SAMPLE), CAP,
                                       CHUNK)
            tl.debug_barrier()  # the scratch row's writes before its reads, in every warp
        if (count > CAP) | (count < K):
            _select_by_passes(x_row, out_row, pt_row, kv_len, page_size, K, CHUNK)
        else:
            j = tl.arange(0, CAP)
            live = j < count
            pos = j
            if kv_len > CAP:
                pos = tl.load(cand_row + j, mask=live, other=0)
            key = _order_keys(tl.load(x_row + pos, mask=live, other=0.0))
            store_largest(tl.where(live, key, tl.zeros_like(key)), pos, K, out_row, pt_row, page_size)


def sampled_topk_slots(logits: Tensor, row_kv_len: Tensor, page_table: Tensor, row_req: Tensor, page_size: int,
                       topk: int, num_warps: int | None = None, chunk: int | None = None,
                       maxnreg: int | None = None) -> Tensor:
    """See reference.topk_slots; logits [T, L] fp32, unit stride (positions >= kv_len ignored). num_warps, chunk,
    maxnreg: a benchmark's overrides (one warp per 512 candidates, 4 to 8, 8 keys per thread in a step of a
    pass, MAXNREG)."""
    if not fits(topk):
        raise ValueError(f"sampled_topk_slots selects at most 8192 keys per row, got k = {topk}")
    out, row_kv_len, page_table, row_req = selection_inputs("sampled_topk_slots", logits, row_kv_len, page_table,
                                                            row_req, topk)
    T, L = logits.shape
    if T == 0 or topk == 0:
        return out
    width = cap(topk)
    num_warps = num_warps or max(4, min(8, width // 512))
    cand = new_empty((T, width), torch.int32, logits.device)
    _sampled_topk_slots_kernel[(T,)](
        logits, row_kv_len, page_table, row_req, out, cand, logits.stride(0), row_kv_len.stride(0),
        page_table.stride(0), out.stride(0), cand.stride(0), L, page_size, K=topk, KB=next_pow2(topk), CAP=width,
        SAMPLE=sample_size(topk, L), CHUNK=chunk or KEYS_PER_THREAD * 32 * num_warps, num_warps=num_warps,
        maxnreg=maxnreg or MAXNREG, **pdl(logits))
    return out


__all__ = ["KEYS_PER_THREAD", "MAXNREG", "WIDE_ROWS", "cap", "fits", "sample_size", "sampled_topk_slots"]
