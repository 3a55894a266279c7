"""Fused cache writes: rows (quantized to FP8, or as they are) scattered into their cache slots in one kernel.

One program owns one token row. Optionally the row is first RMS-normed (the latent's kv_a_layernorm) and
its rope values rotated (k_pe's rotary), with the roundings of the unfused kernels (_common.rms_normed,
_common.rotate): the latent write then replaces three launches per layer. FP8 rows: each block of 128
values gets its max, its power-of-two scale (2^ceil(log2(amax / 448)), from the fp32 exponent bits), the
e4m3 values and the scale; the rope values are copied as bf16. The bytes equal cache.kv_format.quantize_fp8
(round to nearest even), which the CPU path and the tests use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.cache.kv_format import BLOCK, FP8_MAX, fp8_views, num_blocks
from dsaserve.cache.pools import IndexKeyPrologue, LatentPrologue
from dsaserve.ops.triton._common import (hadamard_rows, layer_normed, next_pow2, norm_warps, pdl, pdl_start, rms_normed,
                                         rotate, round_as)

Tensor = torch.Tensor


@triton.jit
def _row_and_rope(X, R, W, COS, SIN, t, stride_x, stride_r, stride_cos, stride_sin, N, R_DIM, eps,
                  BLOCK_X: tl.constexpr, BLOCK_R: tl.constexpr, HAS_ROPE: tl.constexpr, NORM: tl.constexpr,
                  ROTARY: tl.constexpr):
    """Row t's values [BLOCK_X] and rope values [BLOCK_R] in fp32 (masked lanes 0), after the prologue."""
    d = tl.arange(0, BLOCK_X)
    x = tl.load(X + t * stride_x + d, mask=d < N, other=0.0).to(tl.float32)
    if NORM:
        x = rms_normed(x, tl.load(W + d, mask=d < N, other=0.0).to(tl.float32), N, eps, X.dtype.element_ty,
                       X.dtype.element_ty)
    rope = tl.zeros([BLOCK_R], tl.float32)
    if HAS_ROPE:
        if ROTARY:  # interleaved pairs in, half-split order out (Rotary.apply)
            i = tl.arange(0, BLOCK_R // 2)
            imask = i < R_DIM // 2
            cos = tl.load(COS + t * stride_cos + i, mask=imask, other=0.0).to(tl.float32)
            sin = tl.load(SIN + t * stride_sin + i, mask=imask, other=0.0).to(tl.float32)
            x1 = tl.load(R + t * stride_r + 2 * i, mask=imask, other=0.0).to(tl.float32)
            x2 = tl.load(R + t * stride_r + 2 * i + 1, mask=imask, other=0.0).to(tl.float32)
            y1, y2 = rotate(x1, x2, cos, sin, R.dtype.element_ty)
            rope = tl.reshape(tl.permute(tl.join(y1, y2), (1, 0)), [BLOCK_R])  # [y1 | y2]: half-split order
        else:
            dr = tl.arange(0, BLOCK_R)
            rope = tl.load(R + t * stride_r + dr, mask=dr < R_DIM, other=0.0).to(tl.float32)
    return x, rope


@triton.jit
def _store_fp8(x, VALUES, SCALES, N, QBLOCK: tl.constexpr, BLOCKS: tl.constexpr, FP8_MAX_C: tl.constexpr):
    """One row's values x [BLOCKS * QBLOCK] fp32 (masked lanes 0) as e4m3 blocks with power-of-two scales."""
    x = tl.reshape(x, [BLOCKS, QBLOCK])
    ratio = tl.maximum(tl.max(tl.abs(x), 1) / FP8_MAX_C, 1.1754943508222875e-38)  # >= the smallest normal
    bits = ratio.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)  # ceil to a power of two
    scale = (exponent << 23).to(tl.float32, bitcast=True)
    inverse = ((254 - exponent) << 23).to(tl.float32, bitcast=True)  # 1 / scale, exact: x * inverse is x / scale
    b = tl.arange(0, BLOCKS)
    d = b[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    tl.store(VALUES + d, (x * inverse[:, None]).to(VALUES.dtype.element_ty), mask=d < N)
    tl.store(SCALES + b, scale, mask=b * QBLOCK < N)


@triton.jit(do_not_specialize=["N", "R_DIM"])
def _write_fp8_kernel(X, R, W, COS, SIN, SLOTS, VALUES, SCALES, ROPE,
                      stride_x, stride_r, stride_cos, stride_sin, stride_v, stride_s, stride_rope, N, R_DIM, eps,
                      QBLOCK: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_R: tl.constexpr, HAS_ROPE: tl.constexpr,
                      NORM: tl.constexpr, ROTARY: tl.constexpr, FP8_MAX_C: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    x, rope = _row_and_rope(X, R, W, COS, SIN, t, stride_x, stride_r, stride_cos, stride_sin, N, R_DIM, eps,
                            BLOCKS * QBLOCK, BLOCK_R, HAS_ROPE, NORM, ROTARY)
    _store_fp8(x, VALUES + slot * stride_v, SCALES + slot * stride_s, N, QBLOCK, BLOCKS, FP8_MAX_C)
    if HAS_ROPE:
        dr = tl.arange(0, BLOCK_R)
        tl.store(ROPE + slot * stride_rope + dr, rope.to(ROPE.dtype.element_ty), mask=dr < R_DIM)


def _launch_args(x: Tensor, rope: Tensor | None, prologue: LatentPrologue | None) -> tuple:
    """(x, rope source, norm weight, cos, sin, rope dims, flags) with unit last strides; unused pointers are x."""
    if x.stride(1) != 1:
        x = x.contiguous()
    has_rope = rope is not None and rope.shape[1] > 0
    r = (rope if rope.stride(1) == 1 else rope.contiguous()) if has_rope else x
    p = prologue
    w, cos, sin = (p.norm_weight.contiguous(), p.cos, p.sin) if p is not None else (x, x, x)
    return x, r, w, cos, sin, r.shape[1] if has_rope else 0, has_rope


def write_fp8_rows(cache: Tensor, slots: Tensor, x: Tensor, rope: Tensor | None = None,
                   prologue: LatentPrologue | None = None) -> None:
    """cache[slots] = quantize_fp8(x, rope) for a uint8 FP8 cache [S, bytes]; x [T, n], rope [T, r]; with a
    prologue x is RMS-normed and the rope rotated first (prologue_applies)."""
    T, n = x.shape
    if T == 0:
        return
    values, scales, rope_out = fp8_views(cache, n, rope.shape[1] if rope is not None else 0)
    x, r, w, cos, sin, r_dim, has_rope = _launch_args(x, rope, prologue)
    slots = slots.to(torch.int32).contiguous()
    _write_fp8_kernel[(T,)](
        x, r, w, cos, sin, slots, values, scales, rope_out, x.stride(0), r.stride(0), cos.stride(0), sin.stride(0),
        values.stride(0), scales.stride(0), rope_out.stride(0), n, r_dim, prologue.eps if prologue else 0.0,
        QBLOCK=BLOCK, BLOCKS=next_pow2(num_blocks(n), 1), BLOCK_R=next_pow2(max(r_dim, 2), 2), HAS_ROPE=has_rope,
        NORM=prologue is not None, ROTARY=prologue is not None and has_rope, FP8_MAX_C=FP8_MAX,
        num_warps=norm_warps(BLOCK * next_pow2(num_blocks(n), 1)), **pdl(x))


@triton.jit(do_not_specialize=["N", "R_DIM"])
def _write_rows_kernel(X, R, W, COS, SIN, SLOTS, CACHE, stride_x, stride_r, stride_cos, stride_sin, stride_c,
                       N, R_DIM, eps, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, HAS_ROPE: tl.constexpr,
                       NORM: tl.constexpr, ROTARY: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    x, rope = _row_and_rope(X, R, W, COS, SIN, t, stride_x, stride_r, stride_cos, stride_sin, N, R_DIM, eps,
                            BLOCK, BLOCK_R, HAS_ROPE, NORM, ROTARY)
    d = tl.arange(0, BLOCK)
    tl.store(CACHE + slot * stride_c + d, x.to(CACHE.dtype.element_ty), mask=d < N)
    if HAS_ROPE:
        dr = tl.arange(0, BLOCK_R)
        tl.store(CACHE + slot * stride_c + N + dr, rope.to(CACHE.dtype.element_ty), mask=dr < R_DIM)


def write_rows(cache: Tensor, slots: Tensor, x: Tensor, rope: Tensor | None = None,
               prologue: LatentPrologue | None = None) -> None:
    """cache[slots] = cat([x, rope], -1) in the cache's dtype, one launch (index_put needed a cat and int64
    slots: four launches per layer); with a prologue x is RMS-normed and the rope rotated first."""
    T, n = x.shape
    if T == 0:
        return
    x, r, w, cos, sin, r_dim, has_rope = _launch_args(x, rope, prologue)
    _write_rows_kernel[(T,)](x, r, w, cos, sin, slots.to(torch.int32), cache, x.stride(0), r.stride(0),
                             cos.stride(0), sin.stride(0), cache.stride(0), n, r_dim,
                             prologue.eps if prologue else 0.0, BLOCK=next_pow2(n, 1),
                             BLOCK_R=next_pow2(max(r_dim, 2), 2), HAS_ROPE=has_rope, NORM=prologue is not None,
                             ROTARY=prologue is not None and has_rope, num_warps=norm_warps(next_pow2(n, 1)),
                             **pdl(x))


@triton.jit(do_not_specialize=["N"])
def _write_index_key_kernel(X, W, B, COS, SIN, SLOTS, VALUES, SCALES, stride_x, stride_cos, stride_sin, stride_v,
                            stride_s, N, eps, scale, BLOCK: tl.constexpr, HALF: tl.constexpr,
                            INTERLEAVED: tl.constexpr, FP8: tl.constexpr, LOG_N: tl.constexpr,
                            QBLOCK: tl.constexpr, BLOCKS: tl.constexpr, FP8_MAX_C: tl.constexpr, PDL: tl.constexpr):
    """One index key: its LayerNorm, the rotary of its first 2 * HALF values, then over an FP8 cache the
    Hadamard rotation of the row and the FP8 blocks, else the row itself, into its slot. The row X is the
    scratch: the normed row is stored back so that the rotary reads its pairs, as the rotary kernel does."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    row = X + t * stride_x
    dt = X.dtype.element_ty
    d = tl.arange(0, BLOCK)
    mask = d < N
    x = tl.load(row + d, mask=mask, other=0.0).to(tl.float32)
    x = layer_normed(x, tl.load(W + d, mask=mask, other=0.0).to(tl.float32),
                     tl.load(B + d, mask=mask, other=0.0).to(tl.float32), mask, N, eps, dt)
    tl.store(row + d, x.to(dt), mask=mask)
    tl.debug_barrier()  # the block's stores are visible to its threads after the barrier
    i = tl.arange(0, HALF)
    if INTERLEAVED:
        first, second = row + 2 * i, row + 2 * i + 1
    else:
        first, second = row + i, row + HALF + i
    cos = tl.load(COS + t * stride_cos + i).to(tl.float32)
    sin = tl.load(SIN + t * stride_sin + i).to(tl.float32)
    y1, y2 = rotate(tl.load(first).to(tl.float32), tl.load(second).to(tl.float32), cos, sin, dt)
    tl.debug_barrier()  # every pair read before any is overwritten
    tl.store(row + i, y1.to(dt))  # half-split order (Rotary.apply)
    tl.store(row + HALF + i, y2.to(dt))
    tl.debug_barrier()
    x = tl.load(row + d, mask=mask, other=0.0).to(tl.float32)
    if FP8:  # the Hadamard basis of an FP8 index cache (hadamard_reference's butterflies and rounding)
        x = round_as(tl.reshape(hadamard_rows(tl.reshape(x, [1, BLOCK]), 1, BLOCK, LOG_N), [BLOCK]) * scale, dt)
        _store_fp8(x, VALUES + slot * stride_v, SCALES + slot * stride_s, N, QBLOCK, BLOCKS, FP8_MAX_C)
    else:
        tl.store(VALUES + slot * stride_v + d, x.to(VALUES.dtype.element_ty), mask=mask)


def write_index_keys(cache: Tensor, slots: Tensor, keys: Tensor, prologue: IndexKeyPrologue) -> None:
    """cache[slots] = the keys after their prologue (index_prologue_applies): over a uint8 FP8 cache the
    Hadamard-rotated FP8 rows (kv_format), else the rows. `keys` [T, n] is overwritten (scratch)."""
    T, n = keys.shape
    if T == 0:
        return
    p = prologue
    fp8 = cache.dtype == torch.uint8
    values, scales, _ = fp8_views(cache, n, 0) if fp8 else (cache, cache, None)
    blocks = next_pow2(num_blocks(n), 1)
    width = blocks * BLOCK if fp8 else next_pow2(n, 1)  # whole FP8 blocks (a 64-wide row pads to 128)
    _write_index_key_kernel[(T,)](
        keys, p.weight, p.bias, p.cos, p.sin, slots.to(torch.int32), values, scales, keys.stride(0),
        p.cos.stride(0), p.sin.stride(0), values.stride(0), scales.stride(0), n, p.eps, n ** -0.5,
        BLOCK=width, HALF=p.rope_dims // 2, INTERLEAVED=p.interleaved, FP8=fp8, LOG_N=n.bit_length() - 1,
        QBLOCK=BLOCK, BLOCKS=blocks, FP8_MAX_C=FP8_MAX, num_warps=norm_warps(width), **pdl(keys))


def index_prologue_applies(keys: Tensor, prologue: IndexKeyPrologue) -> bool:
    """Power-of-two rows (the Hadamard rotation; at most 1024 values), written in place (unit column stride),
    LayerNorm parameters, cos and sin in the keys' dtype, a power-of-two rotary width within the row."""
    T, n = keys.shape
    p, r = prologue, prologue.rope_dims
    return (1 <= n <= 1024 and n & (n - 1) == 0 and keys.stride(1) == 1 and 2 <= r <= n and r & (r - 1) == 0
            and p.weight.dtype == p.bias.dtype == p.cos.dtype == p.sin.dtype == keys.dtype
            and p.weight.shape == p.bias.shape == (n,) and p.weight.stride(0) == p.bias.stride(0) == 1
            and p.cos.shape == p.sin.shape == (T, r // 2) and p.cos.stride(-1) == p.sin.stride(-1) == 1)


def prologue_applies(x: Tensor, rope: Tensor, prologue: LatentPrologue) -> bool:
    """The kernels' prologue: the norm rounds to x's dtype (weight of that dtype, as rms_norm's output dtype
    is then x's), the rotary in the rope's dtype over a power-of-two number of dims."""
    T, r = rope.shape
    p = prologue
    return (p.norm_weight.dtype == x.dtype and p.norm_weight.shape == (x.shape[1],) and r >= 2 and r & (r - 1) == 0
            and p.cos.dtype == p.sin.dtype == rope.dtype and p.cos.shape == p.sin.shape == (T, r // 2)
            and p.cos.stride(-1) == p.sin.stride(-1) == 1)


__all__ = ["index_prologue_applies", "prologue_applies", "write_fp8_rows", "write_index_keys", "write_rows"]
