"""The absorbed MLA's per-head products at decode rows, as programmatic-dependent Triton launches.

  absorb_query:  out[t, h] = [q_nope[t, h] @ W_UK[h] | rotary(q_pe[t, h])]   (the latent-space query)
  absorb_output: out[t, h] = o_lat[t, h] @ W_UV[h]^T

cuBLAS's batched GEMM did both before: it is not launched with PDL, so each call waited for the previous
kernel to drain and paid its launch in full, and q_pe's rotary was a third launch. Here one program owns one
head and one block of output columns and does the whole reduction (128 or 512 values) in one dot, its rows
padded to 16: a decode step's few rows read each weight once, spread over H x column-block programs. Used for
decode rows of a few heads (`decode_shape`), where they were measured faster.
The products accumulate in fp32 and round once to the output dtype (cuBLAS's sums, in another order; fp32 inputs
multiply exactly, not in TF32); the rotary rounds as Rotary.apply does (the rotary kernel's `rotate`): bit for bit
in bf16, within fused multiply-adds' difference in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.fp8 import FP8, QuantizedRows
from dsaserve.ops.triton._common import (dot_precision, new_empty, next_pow2, pdl, pdl_start, pow2_tile, quantize_rows,
                                         rotate)

Tensor = torch.Tensor
# Where these launches beat cuBLAS's batched GEMM (+ the rotary kernel) in a graph of back-to-back calls (H200,
# 2026-12-03, docs/benchmarks.md): 16 heads (a --tp 8 rank) up to 32 rows, 32 heads up to 16. At 64 rows, or
# 128 heads (a DP-attention rank reads 16 MB of W_UV per call), cuBLAS streams the weights faster. One program
# holds all the rows: never more than MAX_ROWS (fewer heads were not measured).
MAX_ROWS = 32
MAX_HEADS = 32
MAX_ROW_HEADS = 512
QUERY_COLUMNS = 64  # output columns per program of absorb_query (512 latent columns: 8 programs per head)
OUTPUT_COLUMNS = 16  # output columns per program of absorb_output (128 value columns: 8 programs per head)
# Latent values per dot when a program owns a whole quantization group (128 columns: 16 programs at 16 heads),
# pipelined by the launch's default 3 stages: 128 took 0.82-0.89x the time of 64 at 1-32 rows of 16 and 32 heads
# (H100; 0.81x at 16 heads on an H200; 2026-12-06, docs/benchmarks.md)
QUANT_CHUNK = 128


def decode_shape(T: int, H: int) -> bool:
    """Whether T rows of H heads run here (measured faster) rather than through cuBLAS."""
    return 0 < T <= MAX_ROWS and H <= MAX_HEADS and T * H <= MAX_ROW_HEADS


@triton.jit
def _absorb_query_kernel(Q, W, COS, SIN, OUT, T, stride_qt, stride_qh, stride_wh, stride_wd, stride_ot, stride_oh,
                         stride_c, stride_s, NOPE: tl.constexpr, HALF: tl.constexpr, LATENT: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    h = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    t = tl.arange(0, BLOCK_T)
    rows = (t < T)[:, None]
    d = tl.arange(0, NOPE)
    c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    q_row = Q + t.to(tl.int64)[:, None] * stride_qt + h * stride_qh
    out_row = OUT + t.to(tl.int64)[:, None] * stride_ot + h * stride_oh
    q = tl.load(q_row + d[None, :], mask=rows, other=0.0)
    w = tl.load(W + h * stride_wh + d[:, None] * stride_wd + c[None, :])
    tl.store(out_row + c[None, :], tl.dot(q, w, input_precision=PRECISION).to(OUT.dtype.element_ty), mask=rows)
    if block == 0:  # q_pe's rotary (interleaved pairs in, half-split order out) into the last 2 * HALF values
        i = tl.arange(0, HALF)
        cos = tl.load(COS + t[:, None] * stride_c + i[None, :], mask=rows, other=0.0).to(tl.float32)
        sin = tl.load(SIN + t[:, None] * stride_s + i[None, :], mask=rows, other=0.0).to(tl.float32)
        x1 = tl.load(q_row + NOPE + 2 * i[None, :], mask=rows, other=0.0).to(tl.float32)
        x2 = tl.load(q_row + NOPE + 2 * i[None, :] + 1, mask=rows, other=0.0).to(tl.float32)
        dt = Q.dtype.element_ty
        y1, y2 = rotate(x1, x2, cos, sin, dt)
        tl.store(out_row + LATENT + i[None, :], y1.to(dt), mask=rows)
        tl.store(out_row + LATENT + HALF + i[None, :], y2.to(dt), mask=rows)


@triton.jit
def _absorb_output_kernel(X, W, OUT, Q, QS, T, stride_xt, stride_xh, stride_wh, stride_wv, stride_ot, stride_oh,
                          stride_qt, stride_qst, LATENT: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_V: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """The reduction in LATENT / CHUNK dots. QUANT: the program's BLOCK_V columns are one quantization group of the
    [T, H * v] rows, written quantized into Q / QS too (act_quant of the stored values)."""
    pdl_start(PDL)
    h = tl.program_id(0).to(tl.int64)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    t = tl.arange(0, BLOCK_T)
    rows = (t < T)[:, None]
    out = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
    for start in tl.range(0, LATENT, CHUNK):
        c = start + tl.arange(0, CHUNK)
        x = tl.load(X + t.to(tl.int64)[:, None] * stride_xt + h * stride_xh + c[None, :], mask=rows, other=0.0)
        w = tl.load(W + h * stride_wh + v[:, None] * stride_wv + c[None, :])
        out += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    stored = out.to(OUT.dtype.element_ty)
    tl.store(OUT + t.to(tl.int64)[:, None] * stride_ot + h * stride_oh + v[None, :], stored, mask=rows)
    if QUANT:
        q, scale = quantize_rows(stored.to(tl.float32))
        column = h * tl.num_programs(1) * BLOCK_V + v  # the value's column in the [T, H * v] rows o_proj reads
        tl.store(Q + t.to(tl.int64)[:, None] * stride_qt + column[None, :], q, mask=rows)
        tl.store(QS + t.to(tl.int64) * stride_qst + h * tl.num_programs(1) + tl.program_id(1), scale, mask=t < T)


def query_applies(q: Tensor, w_uk: Tensor, cos: Tensor, sin: Tensor, out: Tensor) -> bool:
    """q [T, H, nope + rope] (rows of unit stride), w_uk [H, nope, latent] (unit column stride), cos / sin
    [T, rope / 2], out [T, H, latent + rope] of q's dtype; nope and latent powers of two, a decode_shape."""
    T, H, D = q.shape
    nope, latent = w_uk.shape[1:]
    rope = D - nope
    return (decode_shape(T, H) and pow2_tile(nope) and pow2_tile(latent) and latent % QUERY_COLUMNS == 0 and rope >= 2
            and rope & (rope - 1) == 0 and w_uk.shape[0] == H and q.dtype == w_uk.dtype == cos.dtype == out.dtype
            and sin.dtype == q.dtype and out.shape == (T, H, latent + rope) and cos.shape == sin.shape == (T, rope // 2)
            and q.stride(2) == 1 and w_uk.stride(2) == 1 and out.stride(2) == 1 and cos.stride(1) == sin.stride(1) == 1)


def absorb_query(q: Tensor, w_uk: Tensor, cos: Tensor, sin: Tensor, out: Tensor) -> Tensor:
    """See dsaserve.ops.fused.absorb_query (query_applies holds)."""
    T, H, D = q.shape
    nope, latent = w_uk.shape[1:]
    _absorb_query_kernel[(H, latent // QUERY_COLUMNS)](
        q, w_uk, cos, sin, out, T, q.stride(0), q.stride(1), w_uk.stride(0), w_uk.stride(1), out.stride(0),
        out.stride(1), cos.stride(0), sin.stride(0), NOPE=nope, HALF=(D - nope) // 2, LATENT=latent,
        BLOCK_T=next_pow2(T), BLOCK_C=QUERY_COLUMNS, PRECISION=dot_precision(q.dtype), num_warps=4, **pdl(q))
    return out


def output_applies(x: Tensor, w_uv: Tensor, out: Tensor) -> bool:
    """x [T, H, latent], w_uv [H, v, latent] (unit column strides), out [T, H, v] of x's dtype; latent a power of
    two, v a multiple of OUTPUT_COLUMNS, a decode_shape."""
    T, H, latent = x.shape
    return (decode_shape(T, H) and pow2_tile(latent) and w_uv.shape[0] == H and w_uv.shape[2] == latent
            and w_uv.shape[1] % OUTPUT_COLUMNS == 0 and x.dtype == w_uv.dtype == out.dtype
            and out.shape == (T, H, w_uv.shape[1]) and x.stride(2) == w_uv.stride(2) == out.stride(2) == 1)


def quantizes_output(w_uv: Tensor, group: int) -> bool:
    """Whether absorb_output can also write its rows quantized in groups of `group`: whole groups per head."""
    return pow2_tile(group) and w_uv.shape[1] % group == 0


def absorb_output(x: Tensor, w_uv: Tensor, out: Tensor, quant_group: int = 0) -> tuple[Tensor, QuantizedRows | None]:
    """See dsaserve.ops.fused.absorb_output (output_applies holds; quant_group > 0 where quantizes_output allows).
    Quantizing, a program owns a whole group of a head's columns (128: 8x the columns,
    so the reduction runs in chunks of QUANT_CHUNK latent values, over 8 warps)."""
    T, H, latent = x.shape
    v = w_uv.shape[1]
    fp8 = None
    q = qs = out
    block_v, chunk = OUTPUT_COLUMNS, latent
    if quant_group:
        fp8 = QuantizedRows(new_empty((T, H * v), FP8, x.device),
                            new_empty((T, H * v // quant_group), torch.float32, x.device), quant_group)
        q, qs, block_v, chunk = fp8.values, fp8.scales, quant_group, min(QUANT_CHUNK, latent)
    _absorb_output_kernel[(H, v // block_v)](
        x, w_uv, out, q, qs, T, x.stride(0), x.stride(1), w_uv.stride(0), w_uv.stride(1), out.stride(0), out.stride(1),
        q.stride(0), qs.stride(0), LATENT=latent, CHUNK=chunk, BLOCK_T=next_pow2(T), BLOCK_V=block_v,
        QUANT=fp8 is not None, PRECISION=dot_precision(x.dtype), num_warps=8 if fp8 else 4, **pdl(x))
    return out, fp8


__all__ = ["MAX_HEADS", "MAX_ROWS", "MAX_ROW_HEADS", "absorb_output", "absorb_query", "decode_shape", "output_applies",
           "query_applies", "quantizes_output"]
