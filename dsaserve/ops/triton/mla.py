"""Sparse MLA (absorbed form) over per-row selected cache slots, FlashMLA-style.

One program owns one query row and a block of BLOCK_H heads: heads are the M dimension of both products,
so each selected latent row is loaded once into shared memory and reused by every head of the block (and
for both QK^T and PV). The D = v_dim + rope dims are split into a latent part (padded to BLOCK_V) and a
rope part (padded to BLOCK_R) so that 576 = 512 + 64 costs no padding. Online softmax runs over blocks of
BLOCK_N selected indices, in the exp2 domain, with fp32 accumulators.

FP8 caches (uint8 rows, cache/kv_format.py) are read in place: the gathered e4m3 latent block is converted to
the query's dtype and multiplied by its per-128 power-of-two scales (exact), the rope part is bf16; the dots
then run as for a bf16 cache (FlashMLA's scheme). Triton does not pipeline those gathers, so the 16-head
programs of a `--tp 8` rank prefetch them by hand, a block ahead (PREFETCH). On Hopper the Gluon kernel
(mla_gluon) runs instead for more than 32 heads, and for fewer at the row counts _gluon names.

When rows x head-blocks cannot fill the GPU (decode), the selected indices are split across programs
(flash-decoding) and a second kernel merges the normalized partial outputs by their log-sum-exp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.cache.kv_format import row_views
from dsaserve.ops.triton import mla_gluon
from dsaserve.ops.triton._common import dot_precision, is_hopper, new_empty, next_pow2, pdl, pdl_start, sm_count

Tensor = torch.Tensor
LOG2E = 1.4426950408889634

# Tuning override for benchmarks: dict with any of block_h, block_n, num_warps, num_stages, splits, prefetch,
# programs_per_sm (the split rule's target below 33 heads), combine_block_v (the combine's columns per program)
# and gluon (0: Triton's kernel even where mla_gluon applies; 2: the Gluon kernel wherever it applies).
CONFIG: dict[str, int] | None = None


@triton.jit
def _attend(q_lat, q_rope, kv, kr, valid, m_i, l_i, acc, scale_log2, PRECISION: tl.constexpr):
    """One key block of the online softmax: scores, the running max and sum, the accumulator."""
    s = tl.dot(q_lat, tl.trans(kv), input_precision=PRECISION)
    s = tl.dot(q_rope, tl.trans(kr), s, input_precision=PRECISION)
    s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: avoid -inf - -inf
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _rows(KV, KR, KS, slot, stride_kv, stride_kr, stride_ks, dv, dr, sb, vmask, rmask, smask, FP8: tl.constexpr):
    """The latent and rope values of a block's slots, and of an FP8 cache the latent's scales (else a
    placeholder); masked-off (-1) slots issue no memory traffic."""
    valid = (slot >= 0)[:, None]
    slot64 = slot.to(tl.int64)[:, None]
    kv = tl.load(KV + slot64 * stride_kv + dv[None, :], mask=valid & vmask[None, :], other=0.0)
    kr = tl.load(KR + slot64 * stride_kr + dr[None, :], mask=valid & rmask[None, :], other=0.0)
    sc = 0.0
    if FP8:
        sc = tl.load(KS + slot64 * stride_ks + sb[None, :], mask=valid & smask[None, :], other=0.0)
    return kv, kr, sc


@triton.jit
def _dequantize(kv, kr, sc, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                SCALE_BLOCKS: tl.constexpr, FP8: tl.constexpr):
    """An FP8 block in the dot dtype: e4m3 x power-of-two scale is exact in bf16."""
    if FP8:
        kv = tl.reshape(kv.to(dtype), [BLOCK_N, SCALE_BLOCKS, BLOCK_V // SCALE_BLOCKS]) * sc.to(dtype)[:, :, None]
        kv = tl.reshape(kv, [BLOCK_N, BLOCK_V])
        kr = kr.to(dtype)
    return kv, kr


@triton.jit
def _block_slots(IDX, t, stride_it, n0, end, BLOCK_N: tl.constexpr):
    offs = n0 + tl.arange(0, BLOCK_N)
    return tl.load(IDX + t * stride_it + offs, mask=offs < end, other=-1)


@triton.jit(do_not_specialize=["stride_lt", "stride_lh", "num_splits"])  # H x splits; o strides: v_dim multiples
def _sparse_mla_kernel(Q, KV, KR, KS, IDX, LEN, O, LSE,
                       stride_qt, stride_qh, stride_kv, stride_kr, stride_ks, stride_it, stride_len,
                       stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls,
                       H, K, V_DIM, R_DIM, num_splits, scale_log2,
                       BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr,
                       SCALE_BLOCKS: tl.constexpr, HAS_LEN: tl.constexpr, PREFETCH: tl.constexpr,
                       PDL: tl.constexpr):
    pdl_start(PDL)
    pid_h = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    dv = tl.arange(0, BLOCK_V)
    dr = tl.arange(0, BLOCK_R)
    hmask = heads < H
    vmask = dv < V_DIM
    rmask = dr < R_DIM
    dtype = Q.dtype.element_ty if FP8 else KV.dtype.element_ty

    q_ptr = Q + t * stride_qt + heads[:, None] * stride_qh
    q_lat = tl.load(q_ptr + dv[None, :], mask=hmask[:, None] & vmask[None, :], other=0.0).to(dtype)
    q_rope = tl.load(q_ptr + V_DIM + dr[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0).to(dtype)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    row_end = K
    if HAS_LEN:  # the row's selected slots end here (the rest are -1): no blocks of padding
        row_end = tl.minimum(row_end, tl.load(LEN + t * stride_len))
    # The splits share the row's own keys, not K's: decode rows often hold far fewer than index_topk.
    per_split = tl.cdiv(tl.cdiv(row_end, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, row_end)
    sb = tl.arange(0, SCALE_BLOCKS)
    smask = sb * 128 < V_DIM
    if PREFETCH:
        # Triton's pipeliner leaves the FP8 gathers in the loop (the e4m3 tile is converted before its dot; the
        # rope rows' stride is not a multiple of 16 bytes), so this loop prefetches by hand: the next block's
        # rows load into registers while this one is attended, from slots read one block earlier still.
        slot = _block_slots(IDX, t, stride_it, start, end, BLOCK_N)
        kv, kr, sc = _rows(KV, KR, KS, slot, stride_kv, stride_kr, stride_ks, dv, dr, sb, vmask, rmask, smask, FP8)
        nxt = _block_slots(IDX, t, stride_it, start + BLOCK_N, end, BLOCK_N)
        for n0 in range(start, end, BLOCK_N):
            kv_n, kr_n, sc_n = _rows(KV, KR, KS, nxt, stride_kv, stride_kr, stride_ks, dv, dr, sb, vmask, rmask,
                                     smask, FP8)
            nxt_n = _block_slots(IDX, t, stride_it, n0 + 2 * BLOCK_N, end, BLOCK_N)
            kv, kr = _dequantize(kv, kr, sc, dtype, BLOCK_N, BLOCK_V, SCALE_BLOCKS, FP8)
            m_i, l_i, acc = _attend(q_lat, q_rope, kv, kr, slot >= 0, m_i, l_i, acc, scale_log2, PRECISION)
            slot, kv, kr, sc, nxt = nxt, kv_n, kr_n, sc_n, nxt_n
    else:
        for n0 in range(start, end, BLOCK_N):
            slot = _block_slots(IDX, t, stride_it, n0, end, BLOCK_N)
            kv, kr, sc = _rows(KV, KR, KS, slot, stride_kv, stride_kr, stride_ks, dv, dr, sb, vmask, rmask, smask, FP8)
            kv, kr = _dequantize(kv, kr, sc, dtype, BLOCK_N, BLOCK_V, SCALE_BLOCKS, FP8)
            m_i, l_i, acc = _attend(q_lat, q_rope, kv, kr, slot >= 0, m_i, l_i, acc, scale_log2, PRECISION)

    has = l_i > 0.0
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    o_ptr = O + t * stride_ot + heads[:, None] * stride_oh + split * stride_os + dv[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=hmask[:, None] & vmask[None, :])
    tl.store(LSE + t * stride_lt + heads * stride_lh + split * stride_ls, lse, mask=hmask)


@triton.jit(do_not_specialize=["stride_lt", "stride_lh", "NUM_SPLITS"])
def _combine_kernel(PO, PLSE, O, LSE,
                    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                    stride_ot, stride_oh, stride_ft, stride_fh,
                    H, V_DIM, NUM_SPLITS,
                    BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr):
    """Merge normalized split outputs: out = sum_s exp(lse_s - lse) * out_s, lse = logsumexp(lse_s), in one pass
    over the splits in blocks of BLOCK_S (a constant: one compiled variant whatever the split count, which follows
    the rows and the key width of each step), rescaling the running sums by the running max as a block raises it:
    each block's lse and outputs load together, not lse three times before the outputs (at a few rows the combine
    is a chain of dependent loads). Program (head, row, column block): BLOCK_V of the value columns; every block
    computes the row's weights, block 0 alone stores its lse."""
    pdl_start(PDL)
    h = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    dv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = dv < V_DIM
    lse_ptr = PLSE + t * stride_lt + h * stride_lh
    out_ptr = PO + t * stride_pt + h * stride_ph + dv[None, :]
    m = tl.full([], float("-inf"), tl.float32)  # the largest split lse so far
    total = tl.full([], 0.0, tl.float32)  # sum of exp(lse_s - m) so far
    acc = tl.zeros([BLOCK_V], tl.float32)  # sum of exp(lse_s - m) * out_s so far
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < NUM_SPLITS
        lse = tl.load(lse_ptr + s, mask=smask, other=float("-inf"))
        part = tl.load(out_ptr + s[:, None] * stride_ps, mask=smask[:, None] & vmask[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: weights exp(-inf) = 0, no NaN
        scale = tl.exp(m - m_use)
        w = tl.exp(lse - m_use)
        total = total * scale + tl.sum(w, 0)
        acc = acc * scale + tl.sum(part.to(tl.float32) * w[:, None], 0)
        m = m_new
    has = total > 0.0
    acc = acc / tl.where(has, total, 1.0)
    tl.store(O + t * stride_ot + h * stride_oh + dv, acc.to(O.dtype.element_ty), mask=vmask)
    if tl.program_id(2) == 0:
        m_fin = tl.where(m == float("-inf"), 0.0, m)
        tl.store(LSE + t * stride_ft + h * stride_fh, tl.where(has, m_fin + tl.log(tl.where(has, total, 1.0)),
                                                               float("-inf")))


GRID_ROWS = 65535  # CUDA's bound on a grid's second dimension, which holds the query rows (a 64K-token chunk)
# Splits merged per step of _combine_kernel (more splits loop): one compiled variant serves every split count.
COMBINE_SPLITS = 32
# Columns per combine program when rows x heads are few (one row of 16 heads: 16 programs of 512 columns
# leave the GPU idle). 64 columns against 512 at 16 heads, 1K context (H200, 2026-12-03, benchmarks/mla_decode.py
# --sweep): 4 rows (an MTP verify row group at S = 3) 20.9 us vs 25.6, 8 rows 22.6 vs 24.1, 16 rows equal; 4 rows of
# 128 heads 35.4 vs 28.0. More rows fill the GPU with whole rows.
COMBINE_FEW_COLUMNS = 64
COMBINE_FEW_ROW_HEADS = 128


SMEM_TILE_BUDGET = 160 << 10  # bytes of pipelined key tiles; Hopper has 227 KiB per block, q and scratch need the rest
# Except on Hopper 3 stages of 64 bf16 rows of 576 values (compiled: 217 KiB): 5-7% faster than 2 stages at
# 64-1024 rows and 64 heads per program over a bf16 cache (H200, 2026-12-01). An FP8 cache's tiles pass through
# registers to be dequantized: 2 stages there, and none (loads issued in the loop) for 64-head programs from
# 8 rows on: 3-6% faster at 8-1024 rows, 1-5% slower at one row and for 16-head programs (H200, 2026-12-01).
BF16_THREE_STAGES = 3 * 64 * 1152
FP8_UNPIPELINED_MIN_ROWS = 8


def _config(T: int, H: int, K: int, block_v: int, row_bytes: int, sms: int, fp8: bool,
            hopper: bool, gluon: bool = False) -> dict[str, int]:
    """row_bytes: one gathered key row in the dot dtype (576 bf16 values: 1152; fp32 twice that); gluon: the
    Gluon kernel runs (its programs are 64 head rows whatever H: the wide split rule)."""
    cfg = dict(CONFIG or {})
    block_h = cfg.get("block_h") or (16 if H <= 16 else 32 if H <= 32 else 64)
    # 16-head programs (a --tp 8 rank of 128 heads) over an FP8 cache: 32 keys (and 4 warps, before the prefetch
    # below) 1.0-1.25x faster than 64 keys and 8 warps at 1-64 rows (H200, 2026-12-03, docs/benchmarks.md)
    narrow = fp8 and block_h <= 16
    # Their gathers prefetched a block ahead by hand (the kernel's PREFETCH), 8 warps (4 spill): 1-28% faster
    # over rows of 2,048 keys at 1-64 rows, -16% to +18% over 1,040 (H100, 2026-12-05, docs/benchmarks.md)
    prefetch = bool(cfg.get("prefetch", narrow)) and fp8
    warps = cfg.get("num_warps") or (4 if narrow and not prefetch else 8)
    block_n = cfg.get("block_n") or (32 if narrow else 64)
    three = block_v < 512 or (hopper and block_h == 64 and not fp8 and 3 * block_n * row_bytes <= BF16_THREE_STAGES)
    unpipelined = hopper and fp8 and block_h == 64 and T >= FP8_UNPIPELINED_MIN_ROWS  # measured on an H200 only
    stages = cfg.get("num_stages") or (3 if three else 1 if unpipelined else 2)
    budget = BF16_THREE_STAGES if hopper and stages == 3 and not fp8 else SMEM_TILE_BUDGET
    while "block_n" not in cfg and block_n > 16 and stages * block_n * row_bytes > budget:
        block_n //= 2  # fp32 rows are twice as wide: halve the key block rather than exceed shared memory
    splits = cfg.get("splits")
    if splits is None:
        programs = T * triton.cdiv(H, 64 if gluon else block_h)
        blocks = max(1, triton.cdiv(K, block_n))
        # Up to one key block per split (of K's blocks); the kernel divides each row's own keys among them.
        # A Gluon program fills an SM (216 KiB of shared memory) at any head count: one wave, as 64 heads. At 16
        # heads over FP8 rows that took 0.83x / 0.79x the time of the narrow rule's three programs per SM at 64 /
        # 32 rows of 4,096 keys, 0.88-0.98x at 16 (H100, 2026-12-05, benchmarks/mla_decode.py --sweep).
        if block_h <= 32 and not gluon:  # memory-bound: three programs per SM (4-warp ones fit together) keep
            # more gathered rows in flight; a prefetching program (8 warps, one per SM) keeps its own in flight,
            # and up to 16 of them ran fastest in one wave, more of them in three
            per_sm = cfg.get("programs_per_sm") or (1 if prefetch and programs <= 16 else 3)
            splits = min(triton.cdiv(per_sm * sms, programs), blocks)
        else:  # matrix-bound: split only when rows x head-blocks leave SMs idle, aiming at one full wave
            splits = 1 if programs * 4 >= sms * 3 else min(sms // programs, blocks)
    return dict(block_h=block_h, block_n=block_n, num_warps=warps, num_stages=stages, splits=max(1, splits),
                prefetch=prefetch)


GLUON_NARROW_FP8_MIN_ROWS = 4  # over an FP8 cache, rows from which 16 heads and fewer take the Gluon kernel
GLUON_NARROW_BF16_MIN_ROWS = 64  # over a bf16 cache, rows from which 17-32 heads do (16 and fewer never)


def _gluon(T: int, H: int, fp8: bool, q: Tensor, kv_cache: Tensor, v_dim: int) -> bool:
    """Whether the Gluon kernel runs (mla_gluon's docstring): for more than 32 heads, and for fewer (a --tp 4 / 8
    rank) where its 64-row wgmma tiles, the heads past H masked off, beat Triton's 16- and 32-row programs in
    spite of the padding. H100, 2026-12-05 (benchmarks/mla_narrow.py, docs/benchmarks.md): over an FP8 cache
    32-head programs took 0.33-0.80x Triton's time at 1-4,096 rows, 8- and 16-head ones 0.53-0.92x from 4 rows
    (1.07x at 8 heads x 4 rows over 1,040 keys) and 1.06-1.11x at one row; over a bf16 cache 32 heads 0.72-0.96x
    from 64 rows, 8 and 16 heads 0.89-1.07x. Not measured: 2-3 rows, 17-31 heads, fewer than 8, an H200."""
    mode = (CONFIG or {}).get("gluon", 1)
    if fp8:
        wins = H > 16 or T >= GLUON_NARROW_FP8_MIN_ROWS
    else:
        wins = H > 32 or (H > 16 and T >= GLUON_NARROW_BF16_MIN_ROWS)
    return bool(mode) and (wins or mode == 2) and mla_gluon.applies(q, kv_cache, v_dim)


def sparse_mla(q: Tensor, kv_cache: Tensor, indices: Tensor, sm_scale: float, v_dim: int,
               lengths: Tensor | None = None, max_rows: int = 256) -> tuple[Tensor, Tensor]:
    """See reference.sparse_mla (kv_cache: [S, D] rows or uint8 FP8 rows). `max_rows` is accepted and ignored.
    At most GRID_ROWS rows per call (max_query_rows: DSAOps runs longer prefill chunks in pieces)."""
    T, H, D = q.shape
    K = indices.shape[1]
    rope_dim = D - v_dim
    if T > GRID_ROWS:
        raise ValueError(f"sparse_mla: at most {GRID_ROWS} query rows per call (CUDA's grid), got {T}")
    out = new_empty((T, H, v_dim), q.dtype, q.device)
    lse = new_empty((T, H), torch.float32, q.device)
    if T == 0 or H == 0:
        return out, lse
    if q.stride(2) != 1:
        q = q.contiguous()
    fp8 = kv_cache.dtype == torch.uint8
    if fp8 and q.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"sparse_mla over an FP8 cache needs bf16 or fp32 queries, got {q.dtype}")
    kv, scales, kr = row_views(kv_cache if fp8 else kv_cache.contiguous(), v_dim, rope_dim)  # typed views: no copy
    indices = indices.to(torch.int32).contiguous()
    lens = indices if lengths is None else lengths.reshape(T, -1)
    block_v = next_pow2(v_dim)
    block_r = next_pow2(rope_dim)
    dot_dtype = q.dtype if fp8 else kv.dtype
    row_bytes = (block_v + block_r) * dot_dtype.itemsize
    if fp8 and dot_dtype.itemsize == 4:  # H200: the e4m3 tile staged beside fp32 ones needs 238 KB at 32 keys
        row_bytes += row_bytes // 4
    gluon = _gluon(T, H, fp8, q, kv_cache, v_dim)
    cfg = _config(T, H, K, block_v, row_bytes, sm_count(q), fp8, is_hopper(q), gluon)
    block_n = mla_gluon.BLOCK_N if gluon else cfg["block_n"]
    splits = max(1, min(cfg["splits"], triton.cdiv(K, block_n)))
    scale_log2 = float(sm_scale) * LOG2E
    if splits == 1:
        o_buf, l_buf, o_split, l_split = out, lse, 0, 0
    else:
        # Normalized partials in q's dtype: half the split traffic of fp32, one extra bf16 rounding.
        o_buf = new_empty((T, H, splits, v_dim), q.dtype, q.device)
        l_buf = new_empty((T, H, splits), torch.float32, q.device)
        o_split, l_split = o_buf.stride(2), l_buf.stride(2)
    if gluon:  # Hopper, bf16 queries: both warpgroups share the work (mla_gluon's docstring)
        mla_gluon.launch(q, kv, scales, kr, fp8, indices, lens, lengths is not None, o_buf, l_buf, o_split, l_split,
                         splits, scale_log2)
    else:
        _sparse_mla_kernel[(triton.cdiv(H, cfg["block_h"]), T, splits)](
            q, kv, kr, scales, indices, lens, o_buf, l_buf,
            q.stride(0), q.stride(1), kv.stride(0), kr.stride(0), scales.stride(0), indices.stride(0), lens.stride(0),
            o_buf.stride(0), o_buf.stride(1), o_split, l_buf.stride(0), l_buf.stride(1), l_split,
            H, K, v_dim, rope_dim, splits, scale_log2,
            BLOCK_H=cfg["block_h"], BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_R=block_r,
            PRECISION=dot_precision(dot_dtype), FP8=fp8, SCALE_BLOCKS=max(1, block_v // 128),
            HAS_LEN=lengths is not None, PREFETCH=cfg["prefetch"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **pdl(q))
    if splits > 1:
        block_c = (CONFIG or {}).get("combine_block_v") or (min(COMBINE_FEW_COLUMNS, block_v)
                                                             if T * H <= COMBINE_FEW_ROW_HEADS else block_v)
        _combine_kernel[(H, T, triton.cdiv(v_dim, block_c))](
            o_buf, l_buf, out, lse,
            o_buf.stride(0), o_buf.stride(1), o_buf.stride(2), l_buf.stride(0), l_buf.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            H, v_dim, splits, BLOCK_S=COMBINE_SPLITS, BLOCK_V=block_c, num_warps=4, **pdl(o_buf))
    return out, lse


def max_query_rows(kv_cache: Tensor) -> int:
    """The most query rows one sparse_mla call takes: its grids hold them in their second dimension, which CUDA
    bounds at GRID_ROWS (a 64K-row prefill chunk could not launch)."""
    return GRID_ROWS


def flops(T: int, H: int, K: int, D: int, v_dim: int) -> float:
    """Matrix FLOPs of sparse_mla when all K indices are valid (QK^T over D, PV over v_dim)."""
    return 2.0 * T * H * K * (D + v_dim)


def min_bytes(T: int, H: int, K: int, D: int, v_dim: int, elem: int = 2, row_bytes: int | None = None) -> float:
    """Fewest bytes: the selected rows once per query row (row_bytes each: D * elem unless FP8), q, indices and
    outputs."""
    row = D * elem if row_bytes is None else row_bytes
    return float(T * K * row + T * H * D * elem + T * K * 4 + T * H * (v_dim * elem + 4))


__all__ = ["CONFIG", "flops", "min_bytes", "sparse_mla"]
