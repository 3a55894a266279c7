"""Fused cache writes: rows (quantized to FP8, or as they are) scattered into their cache slots in one kernel.

One program owns one token row and one block of 128 values: the block's max, its power-of-two scale
(2^ceil(log2(amax / 448)), from the fp32 exponent bits), the e4m3 values and the scale land in the row's
slot; the program of block 0 also copies the rope values as bf16. The bytes equal
cache.kv_format.quantize_fp8 (round to nearest even), which the CPU path and the tests use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.cache.kv_format import BLOCK, FP8_MAX, fp8_views, num_blocks
from dsaserve.ops.triton._common import next_pow2, pdl, pdl_start

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["N"])
def _write_fp8_kernel(X, R, SLOTS, VALUES, SCALES, ROPE,
                      stride_x, stride_r, stride_v, stride_s, stride_rope, N, R_DIM,
                      QBLOCK: tl.constexpr, BLOCK_R: tl.constexpr, HAS_ROPE: tl.constexpr,
                      FP8_MAX_C: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    slot = tl.load(SLOTS + t).to(tl.int64)
    d = b * QBLOCK + tl.arange(0, QBLOCK)
    mask = d < N
    x = tl.load(X + t * stride_x + d, mask=mask, other=0.0).to(tl.float32)
    ratio = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX_C, 1.1754943508222875e-38)  # >= the smallest normal
    bits = ratio.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)  # ceil to a power of two
    scale = (exponent << 23).to(tl.float32, bitcast=True)
    inverse = ((254 - exponent) << 23).to(tl.float32, bitcast=True)  # 1 / scale, exact: x * inverse is x / scale
    tl.store(VALUES + slot * stride_v + d, (x * inverse).to(VALUES.dtype.element_ty), mask=mask)
    tl.store(SCALES + slot * stride_s + b, scale)
    if HAS_ROPE:
        if b == 0:
            dr = tl.arange(0, BLOCK_R)
            rmask = dr < R_DIM
            rope = tl.load(R + t * stride_r + dr, mask=rmask, other=0.0)
            tl.store(ROPE + slot * stride_rope + dr, rope.to(ROPE.dtype.element_ty), mask=rmask)


def write_fp8_rows(cache: Tensor, slots: Tensor, x: Tensor, rope: Tensor | None = None) -> None:
    """cache[slots] = quantize_fp8(x, rope) for a uint8 FP8 cache [S, bytes]; x [T, n], rope [T, r]."""
    T, n = x.shape
    if T == 0:
        return
    values, scales, rope_out = fp8_views(cache, n, rope.shape[1] if rope is not None else 0)
    if x.stride(1) != 1:
        x = x.contiguous()
    has_rope = rope is not None and rope.shape[1] > 0
    r = rope if has_rope and rope.stride(1) == 1 else (rope.contiguous() if has_rope else x)
    r_dim = r.shape[1] if has_rope else 0
    slots = slots.to(torch.int32).contiguous()
    _write_fp8_kernel[(T, num_blocks(n))](
        x, r, slots, values, scales, rope_out,
        x.stride(0), r.stride(0), values.stride(0), scales.stride(0), rope_out.stride(0), n, r_dim,
        QBLOCK=BLOCK, BLOCK_R=next_pow2(max(r_dim, 1), 1), HAS_ROPE=has_rope, FP8_MAX_C=FP8_MAX, num_warps=1, **pdl(x))


@triton.jit(do_not_specialize=["N", "R_DIM"])
def _write_rows_kernel(X, R, SLOTS, CACHE, stride_x, stride_r, stride_c, N, R_DIM,
                       BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, HAS_ROPE: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    d = tl.arange(0, BLOCK)
    x = tl.load(X + t * stride_x + d, mask=d < N, other=0.0)
    tl.store(CACHE + slot * stride_c + d, x.to(CACHE.dtype.element_ty), mask=d < N)
    if HAS_ROPE:
        dr = tl.arange(0, BLOCK_R)
        rope = tl.load(R + t * stride_r + dr, mask=dr < R_DIM, other=0.0)
        tl.store(CACHE + slot * stride_c + N + dr, rope.to(CACHE.dtype.element_ty), mask=dr < R_DIM)


def write_rows(cache: Tensor, slots: Tensor, x: Tensor, rope: Tensor | None = None) -> None:
    """cache[slots] = cat([x, rope], -1) in the cache's dtype, one launch (index_put needed a cat and int64
    slots: four launches per layer)."""
    T, n = x.shape
    if T == 0:
        return
    has_rope = rope is not None and rope.shape[1] > 0
    r = rope if has_rope else x
    r_dim = r.shape[1] if has_rope else 0
    _write_rows_kernel[(T,)](x, r, slots.to(torch.int32), cache, x.stride(0), r.stride(0), cache.stride(0), n, r_dim,
                             BLOCK=next_pow2(n, 1), BLOCK_R=next_pow2(max(r_dim, 1), 1), HAS_ROPE=has_rope,
                             num_warps=4 if n >= 512 else 1, **pdl(x))


__all__ = ["write_fp8_rows", "write_rows"]
