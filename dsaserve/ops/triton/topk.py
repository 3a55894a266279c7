"""Exact top-k cache slots per indexer row in one launch: one program per row, the row held in registers.

A row of at most ROW_LIMIT logits (decode steps up to 4-8K context, and prefill rows there) is loaded
once as order-preserving uint32 keys. The k-th largest key is found two bits per pass: three candidate
thresholds are counted at once in two int32 sums (16 passes for 32 bits). The keys above
it, and its ties lowest position first, are compacted in position order with one packed prefix sum, and
their positions mapped to cache slots through the page table. The selected set is torch.topk's, up to the
choice among equal values (-0.0 ranks below +0.0; NaN above everything, as in torch). Rows that see at
most k keys keep their first kv_len positions, as the reference does. Many rows of 8K+ keys select faster in
topk_sampled.py, few in topk_split.py (`fits`, MOST_ROWS; indexer.selection_path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.triton._common import new_empty, next_pow2, pdl, pdl_start

Tensor = torch.Tensor

# The most rows per call at which this kernel was measured the fastest selection, by key width (a power of two
# under CUDA graphs); None: any. H200, docs/benchmarks.md: 1.8x torch.topk at 4096 x 4096 keys; at 8K it ties
# the sampled kernel at 64 rows (23.9 / 23.6 us) and loses from 256 (42.9 / 31.7); at 16K the split path wins
# up to 32 rows and the sampled kernel from 64 (28.0 against 43.0).
MOST_ROWS: dict[int, int | None] = {4096: None, 8192: 64}
ROW_LIMIT = max(MOST_ROWS)


@triton.jit
def _order_keys(x):
    """fp32 -> uint32 with the same order: non-negatives get the sign bit, negatives flip every bit; NaN
    ranks above everything, as in torch.topk."""
    bits = x.to(tl.int32, bitcast=True)
    flip = (bits >> 31) | -2147483648  # arithmetic shift: all ones for negatives
    key = (bits ^ flip).to(tl.uint32, bitcast=True)
    return tl.where(x != x, tl.full(key.shape, 0xFFFFFFFF, tl.uint32), key)


@triton.jit
def _kth_largest(key, K, BITS: tl.constexpr = 32):
    """The K-th largest of `key` (uint32; padding holds 0, below every real key), two bits per pass. The
    counts of keys >= c1 and >= c2 share one int32 sum (16-bit fields; fewer than 2**15 keys keep it
    positive); int32 instead of one packed int64 sum made the kernel 2-10% faster (H200). BITS < 32: only
    the top BITS bits (the rest 0), a lower bound at a fraction of the passes."""
    tl.static_assert(key.shape[0] < 32768)
    v = tl.zeros([], tl.uint32)
    for s in tl.static_range(15, 15 - BITS // 2, -1):
        step = tl.full([], 1, tl.uint32) << (2 * s)
        c1, c2, c3 = v | step, v | (2 * step), v | (3 * step)
        n12 = tl.sum(tl.where(key >= c1, 1, 0) + tl.where(key >= c2, 65536, 0), 0)
        n3 = tl.sum(tl.where(key >= c3, 1, 0), 0)
        n1 = n12 & 0xFFFF
        n2 = n12 >> 16
        v = tl.where(n3 >= K, c3, tl.where(n2 >= K, c2, tl.where(n1 >= K, c1, v)))
    return v


@triton.jit
def position_slots(pt_row, pos, page_size, mask):
    """Cache slots of a request's key positions through its page-table row; -1 where not `mask`."""
    page = tl.load(pt_row + pos // page_size, mask=mask, other=0)
    return tl.where(mask, page * page_size + pos % page_size, -1)


@triton.jit
def store_selected(key, pos, v, need, gt_before, eq_before, out_row, pt_row, page_size):
    """The slots of the keys above v and of the first `need` keys equal to v, lowest positions first, at
    positions `pos` (ascending), stored in position order after gt_before keys above v and eq_before equal ones
    of earlier pieces of the row (a row taken in pieces); this piece's counts of both."""
    gt = (key > v).to(tl.int32)
    eq = (key == v).to(tl.int32)  # v > 0: padding is never a tie
    both = gt + (eq << 16)  # one scan counts both (fewer than 2**15 keys keep the int32 positive)
    before = tl.cumsum(both, 0) - both
    eq_rank = eq_before + (before >> 16)
    sel = (gt != 0) | ((eq != 0) & (eq_rank < need))
    dest = gt_before + (before & 0xFFFF) + tl.minimum(eq_rank, need)
    tl.store(out_row + dest, position_slots(pt_row, pos, page_size, sel), mask=sel)
    return tl.sum(gt, 0), tl.sum(eq, 0)


@triton.jit
def store_largest(key, pos, K, out_row, pt_row, page_size):
    """The slots of the K largest of `key` (uint32 order keys, padding 0; at least K real ones) at positions
    `pos` (ascending), stored in position order; equal keys at the threshold go lowest position first."""
    v = _kth_largest(key, K)
    none = tl.zeros([], tl.int32)
    store_selected(key, pos, v, K - tl.sum((key > v).to(tl.int32), 0), none, none, out_row, pt_row, page_size)


@triton.jit(do_not_specialize=["stride_x", "stride_len", "stride_pt", "stride_o", "L"])
def _row_topk_slots_kernel(X, LEN, PT, REQ, OUT, stride_x, stride_len, stride_pt, stride_o, L, page_size,
                           K: tl.constexpr, KB: tl.constexpr, W: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    kv_len = tl.minimum(tl.load(LEN + t * stride_len), L)
    pt_row = PT + tl.load(REQ + t).to(tl.int64) * stride_pt
    out_row = OUT + t * stride_o
    if kv_len > K:
        offs = tl.arange(0, W)
        live = offs < kv_len
        key = _order_keys(tl.load(X + t * stride_x + offs, mask=live, other=0.0))
        store_largest(tl.where(live, key, tl.zeros_like(key)), offs, K, out_row, pt_row, page_size)
    else:  # at most K keys: all of them, first to last, then -1
        j = tl.arange(0, KB)
        tl.store(out_row + j, position_slots(pt_row, j, page_size, j < kv_len), mask=j < K)


def fits(rows: int, num_keys: int) -> bool:
    """Whether this kernel is the fastest selection for `rows` rows of `num_keys` logits."""
    if num_keys > ROW_LIMIT:
        return False
    most = MOST_ROWS[max(next_pow2(num_keys), min(MOST_ROWS))]
    return most is None or rows <= most


def slot_inputs(rows: int, row_kv_len: Tensor, page_table: Tensor, row_req: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The layout's row lengths [T, 1], page table and row requests as the slot-writing kernels read them."""
    return (row_kv_len.to(torch.int32).reshape(rows, -1), page_table.to(torch.int32),
            row_req.to(torch.int32).contiguous())


def selection_inputs(name: str, logits: Tensor, row_kv_len: Tensor, page_table: Tensor, row_req: Tensor,
                     topk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A selection kernel's output [T, topk] int32 (unwritten) and its slot inputs (slot_inputs), after
    checking its logits: unit-stride fp32."""
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"{name} needs unit-stride fp32 logits, got {logits.dtype}, {logits.stride()}")
    T = logits.shape[0]
    return (new_empty((T, topk), torch.int32, logits.device), *slot_inputs(T, row_kv_len, page_table, row_req))


def row_topk_slots(logits: Tensor, row_kv_len: Tensor, page_table: Tensor, row_req: Tensor, page_size: int,
                   topk: int, num_warps: int | None = None) -> Tensor:
    """See reference.topk_slots; logits [T, L] fp32 with L <= ROW_LIMIT (positions >= kv_len are ignored).
    num_warps: a benchmark's override of the rule (one warp per 512 keys, at least 4: 16 at the widest, 8K;
    the fastest of 4-32 at 4K, 8K and 16K keys on an H200)."""
    T, L = logits.shape
    if L > ROW_LIMIT:
        raise ValueError(f"row_topk_slots takes rows of at most {ROW_LIMIT} logits, got {L}")
    out, row_kv_len, page_table, row_req = selection_inputs("row_topk_slots", logits, row_kv_len, page_table,
                                                            row_req, topk)
    if T == 0 or topk == 0:
        return out
    width = next_pow2(L)
    _row_topk_slots_kernel[(T,)](
        logits, row_kv_len, page_table, row_req, out, logits.stride(0), row_kv_len.stride(0),
        page_table.stride(0), out.stride(0), L, page_size, K=topk, KB=next_pow2(topk), W=width,
        num_warps=num_warps or max(4, min(32, width // 512)), **pdl(logits))
    return out


__all__ = ["MOST_ROWS", "ROW_LIMIT", "fits", "position_slots", "row_topk_slots", "selection_inputs", "slot_inputs",
           "store_largest", "store_selected"]
