"""Sparse MLA in Gluon for Hopper: the two warpgroups share the work instead of duplicating it.

Same function and partial-output contract as mla._sparse_mla_kernel (which calls this where `applies`), for
DeepSeek-V3.2 / GLM-5's 512 latent + 64 rope dims, bf16 queries and 64 heads per program. Triton lays a
chained dot's warps along its rows only, so with 64 head rows and 8 warps both warpgroups compute the same
QK^T: a third of the tensor-core work wasted. Here each warpgroup computes QK^T for 32 of the block's 64
keys, the row statistics meet through shared memory, P reaches both, and each warpgroup multiplies it into
256 of the 512 value columns. bf16 rows are gathered by cp.async into a two-slot ring (slots of -1 read as
zeros) while the previous block is multiplied, and one block's PV runs while the next block's QK^T queues
behind it (_bf16_loop); FP8 rows (kv_format) load the next block's e4m3 values and
scales into registers during QK^T and store them dequantized (exact: power-of-two scales) into the other slot
while the PV runs, their bf16 rope by cp.async. Every block's cache slots are read one block before its rows
move (_block_slots), so a move waits one memory latency, not an index load and then the rows. H200: at least
62% of FlashMLA's speed at 64 and 128 heads, decode- and prefill-shaped (docs/benchmarks.md). Fewer heads (a
--tp 4 / 8 rank) run in the same 64-row tiles, the rows past H zero and never stored: over an FP8 cache from 4
rows 1.1-1.9x faster than Triton's 8- and 16-head programs (but 8 heads x 4 rows over 1,040 keys 7% slower),
1.3-3x at 32 heads (mla._gluon has the rule). In fp32 or at other head dims Triton's kernel runs.
"""
from __future__ import annotations

import functools
import logging

import torch
import triton

from dsaserve.cache import kv_format
from dsaserve.ops import reference

try:  # Gluon ships with recent Triton (3.6 here); without it this path is off
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
except ImportError:  # pragma: no cover - depends on the Triton build
    gluon = None

log = logging.getLogger(__name__)
Tensor = torch.Tensor
BLOCK_H = 64  # heads per program: the rows of both products
BLOCK_N = 64  # keys per step, 32 per warpgroup in QK^T
V_DIM, R_DIM = 512, 64

if gluon is not None:
    # [rows, 512] and [rows, 64] bf16 tiles for 8 warps: 16-byte vectors along each row
    _LAT = gl.constexpr(gl.BlockedLayout([1, 8], [1, 32], [8, 1], [1, 0]))
    _ROPE = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0]))

    @gluon.jit
    def _gather_part(KV, slot, stride_kv, dest, width: gl.constexpr, layout: gl.constexpr):
        cols = gl.arange(0, width, layout=gl.SliceLayout(0, layout))
        ptrs = gl.expand_dims(KV + slot.to(gl.int64) * stride_kv, 1) + gl.expand_dims(cols, 0)
        cp.async_copy_global_to_shared(dest, ptrs, mask=gl.expand_dims(slot >= 0, 1))

    @gluon.jit
    def _gather(KV, KR, lat_slots, rope_slots, stride_kv, stride_kr8, dest_lat, dest_rope, V_DIM: gl.constexpr,
                R_DIM: gl.constexpr, FP8: gl.constexpr):
        """cp.async one block's rows (_block_slots; slots of -1 zero-filled); of an FP8 cache only the bf16
        rope part (its values go through registers, _load_fp8)."""
        if not FP8:
            _gather_part(KV, lat_slots, stride_kv, dest_lat, V_DIM, _LAT)
        # the rope rows' stride comes in units of 8 (16 bytes), so that cp.async may copy 16-byte vectors
        _gather_part(KR, rope_slots, stride_kr8 * 8, dest_rope, R_DIM, _ROPE)
        cp.commit_group()

    # [keys, 4, 128] e4m3 values of an FP8 row, 16 bytes per thread; the scales [keys, 4] in its dim-2 slice
    _FP8_VALUES = gl.constexpr(gl.BlockedLayout([1, 1, 16], [1, 4, 8], [8, 1, 1], [2, 1, 0]))

    @gluon.jit
    def _slots(IDX, t, stride_it, n0, end, BLOCK_N: gl.constexpr, layout: gl.constexpr):
        offs = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        return gl.load(IDX + t * stride_it + offs, mask=offs < end, other=-1)

    @gluon.jit
    def _block_slots(IDX, t, stride_it, n0, end, BLOCK_N: gl.constexpr, FP8: gl.constexpr):
        """The cache slots of rows n0 .. n0 + BLOCK_N (-1 past `end`) in the layouts that move them: the
        latent rows' (cp.async, or _load_fp8's registers) and the rope rows'. The loops read them one block
        before the block is moved, so that its move waits one memory latency, not two."""
        if FP8:
            lat = _slots(IDX, t, stride_it, n0, end, BLOCK_N, gl.SliceLayout(2, _FP8_VALUES))
        else:
            lat = _slots(IDX, t, stride_it, n0, end, BLOCK_N, _LAT)
        return lat, _slots(IDX, t, stride_it, n0, end, BLOCK_N, _ROPE)

    @gluon.jit
    def _load_fp8(KV, KS, slot, stride_kv, stride_ks):
        """The e4m3 latent values and their 4 fp32 scales of the rows in `slot` (slots of -1: zeros)."""
        scales_l: gl.constexpr = gl.SliceLayout(2, _FP8_VALUES)
        valid = gl.expand_dims(slot >= 0, 1)
        slot = slot.to(gl.int64)
        group = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, scales_l)), 0)
        scales = gl.load(KS + gl.expand_dims(slot * stride_ks, 1) + group, mask=valid, other=0.0)
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, _FP8_VALUES)))
        ptrs = (gl.expand_dims(KV + gl.expand_dims(slot * stride_kv, 1) + group * 128, 2)
                + gl.expand_dims(gl.expand_dims(cols, 0), 1))
        return gl.load(ptrs, mask=gl.expand_dims(valid, 2), other=0.0), scales

    @gluon.jit
    def _store_fp8(dest, values, scales, BLOCK_N: gl.constexpr, V_DIM: gl.constexpr):
        """Dequantized into bf16 shared memory: e4m3 x a power-of-two scale is exact in bf16."""
        rows = values.to(gl.float32) * gl.expand_dims(scales, 2)
        dest.store(gl.reshape(rows.to(dest.dtype), [BLOCK_N, V_DIM]))

    @gluon.jit
    def _query_tile(Q, t, stride_qt, stride_qh, heads_start, H, col0: gl.constexpr, width: gl.constexpr,
                    rows: gl.constexpr, layout: gl.constexpr):
        heads = heads_start + gl.arange(0, rows, layout=gl.SliceLayout(1, layout))
        cols = col0 + gl.arange(0, width, layout=gl.SliceLayout(0, layout))
        ptrs = Q + t * stride_qt + gl.expand_dims(heads, 1) * stride_qh + gl.expand_dims(cols, 0)
        return gl.load(ptrs, mask=gl.expand_dims(heads < H, 1), other=0.0)

    @gluon.jit
    def _scores(q_lat, q_rope, k_lat, k_rope, s_zero):
        """QK^T of one gathered block, issued asynchronously (two wgmma groups)."""
        s = warpgroup_mma(q_lat, k_lat.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        return warpgroup_mma(q_rope, k_rope.permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _valid(IDX, t, stride_it, n0, end, BLOCK_N: gl.constexpr, s_l: gl.constexpr):
        offs = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))
        return gl.load(IDX + t * stride_it + offs, mask=offs < end, other=-1) >= 0

    @gluon.jit
    def _softmax_step(s, valid, m_i, l_i, scale_log2, dtype: gl.constexpr, o_l: gl.constexpr):
        """Online softmax over one block's scores: P as PV's register operand, the accumulator's rescale,
        and the new row max and sum."""
        s = gl.where(gl.expand_dims(valid, 0), s * scale_log2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: avoid -inf - -inf
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - gl.expand_dims(m_use, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        p_op = gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2))
        rescale = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_l)), 1)
        return p_op, rescale, m_new, l_i

    @gluon.jit
    def _bf16_loop(q_lat, q_rope, k_lat, k_rope, KV, KR, IDX, t, stride_it, stride_kv, stride_kr8, start, end,
                   blocks, scale_log2, m_i, l_i, acc, s_zero, BLOCK_N: gl.constexpr, V_DIM: gl.constexpr,
                   R_DIM: gl.constexpr, s_l: gl.constexpr, o_l: gl.constexpr):
        """Block i's PV stays in flight while block i + 1's gather lands and its QK^T is issued behind it;
        once the PV is done its slot takes block i + 2. Every wgmma is waited for in the iteration that
        issues it (an accumulator in flight across the back-edge makes ptxas serialize them, C7514).
        2.7% faster than waiting for each product in turn at 1024-4096 rows (docs/benchmarks.md)."""
        dtype: gl.constexpr = q_lat.dtype
        s = s_zero
        valid = gl.zeros([BLOCK_N], gl.int1, gl.SliceLayout(0, s_l))
        lat, rope = _block_slots(IDX, t, stride_it, start, end, BLOCK_N, False)
        if blocks > 0:  # block 0's scores before the loop, block 1 gathered meanwhile
            _gather(KV, KR, lat, rope, stride_kv, stride_kr8, k_lat.index(0), k_rope.index(0), V_DIM, R_DIM, False)
            lat, rope = _block_slots(IDX, t, stride_it, start + BLOCK_N, end, BLOCK_N, False)
            if blocks > 1:
                _gather(KV, KR, lat, rope, stride_kv, stride_kr8, k_lat.index(1), k_rope.index(1), V_DIM, R_DIM,
                        False)
                cp.wait_group(1)
            else:
                cp.wait_group(0)
            lat, rope = _block_slots(IDX, t, stride_it, start + 2 * BLOCK_N, end, BLOCK_N, False)
            fence_async_shared()
            gl.thread_barrier()
            s = _scores(q_lat, q_rope, k_lat.index(0), k_rope.index(0), s_zero)
            valid = _valid(IDX, t, stride_it, start, end, BLOCK_N, s_l)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        for i in range(blocks):  # s: block i's scores; block i + 1 in the other slot or landing there
            slot = i % 2
            n0 = start + i * BLOCK_N
            p_op, rescale, m_i, l_i = _softmax_step(s, valid, m_i, l_i, scale_log2, dtype, o_l)
            pv = warpgroup_mma(p_op, k_lat.index(slot), acc * rescale, is_async=True)
            if i + 1 < blocks:
                cp.wait_group(0)  # block i + 1, the only gather in flight
                fence_async_shared()  # cp.async's writes before the wgmma's reads, in every warp
                gl.thread_barrier()
                s = _scores(q_lat, q_rope, k_lat.index(1 - slot), k_rope.index(1 - slot), s_zero)
                valid = _valid(IDX, t, stride_it, n0 + BLOCK_N, end, BLOCK_N, s_l)
                acc = warpgroup_mma_wait(num_outstanding=2, deps=(pv,))  # this PV: its slot is free
                gl.thread_barrier()  # in both warpgroups
                if i + 2 < blocks:  # block i + 2, its slots read an iteration ago
                    _gather(KV, KR, lat, rope, stride_kv, stride_kr8, k_lat.index(slot), k_rope.index(slot), V_DIM,
                            R_DIM, False)
                lat, rope = _block_slots(IDX, t, stride_it, n0 + 3 * BLOCK_N, end, BLOCK_N, False)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            else:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv,))
        return acc, m_i, l_i

    @gluon.jit
    def _fp8_loop(q_lat, q_rope, k_lat, k_rope, KV, KS, KR, IDX, t, stride_it, stride_kv, stride_ks, stride_kr8,
                  start, end, blocks, scale_log2, m_i, l_i, acc, s_zero, BLOCK_N: gl.constexpr,
                  V_DIM: gl.constexpr, R_DIM: gl.constexpr, s_l: gl.constexpr, o_l: gl.constexpr):
        """The next block's e4m3 values load into registers during this block's QK^T and softmax and are
        stored dequantized into the other slot while its PV runs (its rope by cp.async). Loaded one block
        earlier they spill; converted by integer bit moves instead of through f32 they are no faster
        (docs/benchmarks.md)."""
        dtype: gl.constexpr = q_lat.dtype
        lat, rope = _block_slots(IDX, t, stride_it, start, end, BLOCK_N, True)
        if blocks > 0:
            _gather(KV, KR, lat, rope, stride_kv, stride_kr8, k_lat.index(0), k_rope.index(0), V_DIM, R_DIM, True)
            values, scales = _load_fp8(KV, KS, lat, stride_kv, stride_ks)
            _store_fp8(k_lat.index(0), values, scales, BLOCK_N, V_DIM)
        lat, rope = _block_slots(IDX, t, stride_it, start + BLOCK_N, end, BLOCK_N, True)
        for i in range(blocks):
            slot = i % 2
            n0 = start + i * BLOCK_N
            gl.thread_barrier()  # every warp is done with the slot the next gather overwrites
            # the next block's values load while this one multiplies (past the end: no traffic)
            values, scales = _load_fp8(KV, KS, lat, stride_kv, stride_ks)
            if i + 1 < blocks:
                _gather(KV, KR, lat, rope, stride_kv, stride_kr8, k_lat.index(1 - slot), k_rope.index(1 - slot),
                        V_DIM, R_DIM, True)
                cp.wait_group(1)
            else:
                cp.wait_group(0)
            lat, rope = _block_slots(IDX, t, stride_it, n0 + 2 * BLOCK_N, end, BLOCK_N, True)
            fence_async_shared()  # the stores and cp.async's writes before the wgmma's reads, in every warp
            gl.thread_barrier()
            s = _scores(q_lat, q_rope, k_lat.index(slot), k_rope.index(slot), s_zero)
            valid = _valid(IDX, t, stride_it, n0, end, BLOCK_N, s_l)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            p_op, rescale, m_i, l_i = _softmax_step(s, valid, m_i, l_i, scale_log2, dtype, o_l)
            acc = warpgroup_mma(p_op, k_lat.index(slot), acc * rescale, is_async=True)
            # while the PV runs: the other slot's readers finished before this iteration's first barrier
            _store_fp8(k_lat.index(1 - slot), values, scales, BLOCK_N, V_DIM)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        return acc, m_i, l_i

    @gluon.jit(do_not_specialize=["stride_lt", "stride_lh", "num_splits"])  # H x splits change per step
    def _sparse_mla_kernel(Q, KV, KR, KS, IDX, LEN, O, LSE,
                           stride_qt, stride_qh, stride_kv, stride_kr8, stride_ks, stride_it, stride_len,
                           stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls,
                           H, K, num_splits, scale_log2, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
                           V_DIM: gl.constexpr, R_DIM: gl.constexpr, HAS_LEN: gl.constexpr, FP8: gl.constexpr,
                           num_warps: gl.constexpr):
        t = gl.program_id(1).to(gl.int64)
        split = gl.program_id(2)
        heads_start = gl.program_id(0) * BLOCK_H
        dtype: gl.constexpr = Q.dtype.element_ty
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                      instr_shape=[16, BLOCK_N // 2, 16])  # keys split in two
        o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                      instr_shape=[16, V_DIM // 2, 16])  # values split in two
        q_lat = gl.allocate_shared_memory(dtype, [BLOCK_H, V_DIM],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_H, V_DIM], dtype),
                                          _query_tile(Q, t, stride_qt, stride_qh, heads_start, H, 0, V_DIM, BLOCK_H,
                                                      _LAT))
        q_rope = gl.allocate_shared_memory(dtype, [BLOCK_H, R_DIM],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_H, R_DIM], dtype),
                                           _query_tile(Q, t, stride_qt, stride_qh, heads_start, H, V_DIM, R_DIM,
                                                       BLOCK_H, _ROPE))
        k_lat = gl.allocate_shared_memory(dtype, [2, BLOCK_N, V_DIM],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_N, V_DIM], dtype))
        k_rope = gl.allocate_shared_memory(dtype, [2, BLOCK_N, R_DIM],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_N, R_DIM], dtype))

        row_end = K
        if HAS_LEN:  # the row's selected slots end here (the rest are -1)
            row_end = gl.minimum(row_end, gl.load(LEN + t * stride_len))
        per_split = gl.cdiv(gl.cdiv(row_end, num_splits), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = gl.minimum(start + per_split, row_end)
        blocks = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)

        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
        l_i = gl.full([BLOCK_H], 0.0, gl.float32, layout=gl.SliceLayout(1, s_l))
        acc = gl.zeros([BLOCK_H, V_DIM], gl.float32, o_l)
        s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_l)
        if FP8:
            acc, m_i, l_i = _fp8_loop(q_lat, q_rope, k_lat, k_rope, KV, KS, KR, IDX, t, stride_it, stride_kv,
                                      stride_ks, stride_kr8, start, end, blocks, scale_log2, m_i, l_i, acc, s_zero,
                                      BLOCK_N, V_DIM, R_DIM, s_l, o_l)
        else:
            acc, m_i, l_i = _bf16_loop(q_lat, q_rope, k_lat, k_rope, KV, KR, IDX, t, stride_it, stride_kv,
                                       stride_kr8, start, end, blocks, scale_log2, m_i, l_i, acc, s_zero, BLOCK_N,
                                       V_DIM, R_DIM, s_l, o_l)

        has = l_i > 0.0
        inv = gl.where(has, 1.0 / gl.where(has, l_i, 1.0), 0.0)
        lse = gl.where(has, (m_i + gl.log2(gl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        out = acc * gl.expand_dims(gl.convert_layout(inv, gl.SliceLayout(1, o_l)), 1)
        heads = heads_start + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, o_l))
        dv = gl.arange(0, V_DIM, layout=gl.SliceLayout(0, o_l))
        o_ptr = O + t * stride_ot + gl.expand_dims(heads, 1) * stride_oh + split * stride_os + gl.expand_dims(dv, 0)
        gl.store(o_ptr, out.to(O.dtype.element_ty), mask=gl.expand_dims(heads < H, 1))
        heads_s = heads_start + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, s_l))
        gl.store(LSE + t * stride_lt + heads_s * stride_lh + split * stride_ls, lse, mask=heads_s < H)


def launch(q: Tensor, kv: Tensor, scales: Tensor, kr: Tensor, fp8: bool, indices: Tensor, lens: Tensor,
           has_len: bool, o_buf: Tensor, l_buf: Tensor, o_split: int, l_split: int, splits: int,
           scale_log2: float) -> None:
    """Fill o_buf / l_buf as mla._sparse_mla_kernel does (splits > 1: normalized partials for the combine).
    kv / scales / kr: the latent values, (FP8) scales and rope values: kv_format.row_views of the cache."""
    T, H, _ = q.shape
    _sparse_mla_kernel[(triton.cdiv(H, BLOCK_H), T, splits)](
        q, kv, kr, scales, indices, lens, o_buf, l_buf,
        q.stride(0), q.stride(1), kv.stride(0), kr.stride(0) // 8, scales.stride(0), indices.stride(0), lens.stride(0),
        o_buf.stride(0), o_buf.stride(1), o_split, l_buf.stride(0), l_buf.stride(1), l_split,
        H, indices.shape[1], splits, scale_log2, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, V_DIM=V_DIM, R_DIM=R_DIM,
        HAS_LEN=has_len, FP8=fp8, num_warps=8)


@functools.lru_cache(maxsize=None)
def works(device_index: int) -> bool:
    """Gluon is there, the device is Hopper, and the kernel agrees with the reference over a bf16 and an FP8
    cache on a small case: checked once per device (at start-up, never inside a graph capture). A Triton the
    experimental API no longer fits turns this path off, not the server."""
    if gluon is None or torch.cuda.get_device_capability(device_index)[0] != 9:
        return False
    try:
        dev = torch.device("cuda", device_index)
        gen = torch.Generator(dev).manual_seed(0)
        q = torch.randn(3, 80, V_DIM + R_DIM, device=dev, generator=gen).to(torch.bfloat16)
        rows = torch.randn(500, V_DIM + R_DIM, device=dev, generator=gen).to(torch.bfloat16)
        idx = torch.randint(0, 500, (3, 150), device=dev, generator=gen, dtype=torch.int32)
        idx[:, 100:] = -1
        for cache in (rows, kv_format.quantize_fp8(rows[:, :V_DIM], rows[:, V_DIM:])):
            out = torch.empty(3, 80, V_DIM, dtype=torch.bfloat16, device=dev)
            lse = torch.empty(3, 80, device=dev)
            launch(q, *kv_format.row_views(cache, V_DIM, R_DIM), cache.dtype == torch.uint8, idx, idx, False, out,
                   lse, 0, 0, 1, 1.4426950408889634 / 24.0)
            want, want_lse = reference.sparse_mla(q.float(), cache if cache.dtype == torch.uint8 else cache.float(),
                                                  idx, 1 / 24.0, V_DIM)
            if not ((out.float() - want).norm() / want.norm() < 1e-2 and (lse - want_lse).abs().max() < 1e-2):
                log.warning("the Gluon sparse MLA disagrees with the reference here; Triton's kernel runs instead")
                return False
        return True
    except Exception as exc:  # noqa: BLE001 - any compile or launch failure means: do not use it
        log.warning("the Gluon sparse MLA does not run here (%s: %s); Triton's kernel runs instead",
                    type(exc).__name__, str(exc)[:200])
        return False


def applies(q: Tensor, cache: Tensor, v_dim: int) -> bool:
    """bf16 queries over bf16 rows of 512 + 64 or FP8 rows of 656 bytes, 16-byte aligned rows for cp.async, and
    a kernel that `works` here. Below 64 heads the heads past H are masked off (mla._gluon says when that pays)."""
    D = q.shape[2]
    row_ok = (cache.dtype == torch.bfloat16 and cache.shape[1] >= D and cache.stride(0) % 8 == 0) or (
        cache.dtype == torch.uint8 and cache.shape[1] == kv_format.row_bytes(V_DIM, R_DIM, kv_format.FP8)
        and cache.stride(0) % 16 == 0)
    return (q.is_cuda and q.dtype == torch.bfloat16 and v_dim == V_DIM and D == V_DIM + R_DIM and row_ok
            and q.stride(2) == 1 and cache.stride(1) == 1 and q.stride(1) % 8 == 0
            and q.stride(0) % 8 == 0 and q.data_ptr() % 16 == 0 and cache.data_ptr() % 16 == 0
            and works(q.device.index or 0))


__all__ = ["BLOCK_N", "applies", "launch", "works"]
