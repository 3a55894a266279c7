"""linear_fp32: x . weight^T with fp32 products and an fp32 result, the router's logits (bf16 weight) and the
indexer's head weights (fp32 weight), where torch would convert both operands to fp32 first and run cuBLAS's
fp32 GEMM (at 64 rows of V3.2's router: two conversions and a SIMT GEMM with its split-K reduction, about
30 us of a 490 us decode layer on an H200).

A few rows: one program per (output column, row) on the CUDA cores. More rows of bf16 times a bf16 weight: the
tensor cores, whose bf16 products are exact in fp32 and are accumulated in fp32 (the same products, summed in
another order), K split in 8 so that each chain of tensor-core sums is short (its error against float64 is 1e-6
of the largest value, 1.1e-5 unsplit on an H100). V3.2's router on an H100, graph replays on distinct weights:
6.4-6.7 us at 9-64 rows against torch's 26-28, 8.4 against 46 at 256 rows, 95 against 398 at 4,096."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.triton._common import next_pow2, pdl, pdl_start

Tensor = torch.Tensor

# The row kernel takes up to this many rows (1.3-3.3x faster than torch there on an H200) and weight rows up to
# this length (one row in one program's registers); bf16 times a bf16 weight goes to the tensor cores from
# DOT_MIN_ROWS on (V3.2's router on an H100: 6.4-6.6 us from 8 rows up to 64, the row kernel 6.4 at 8, 11.0 at 16).
FP32_LINEAR_MAX_ROWS = 16
FP32_LINEAR_MAX_IN = 8192
DOT_MIN_ROWS = 9
# The tensor-core kernel's tile (rows, columns, K step, warps, stages, K split): one tile for every row count, so
# a row's value does not depend on how many rows are beside it.
DOT_TILE = (64, 32, 128, 4, 4, 8)


@triton.jit
def _linear_rows_kernel(X, W, OUT, stride_x, stride_w, stride_o, K, scale, BLOCK_K: tl.constexpr,
                        PDL: tl.constexpr):
    """One program per (output column, row): the fp32 product of the row and the column's weight row (any
    float dtypes, converted exactly), times scale; the whole weight row is loaded at once (in registers)."""
    pdl_start(PDL)
    n = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    mask = k < K
    x = tl.load(X + row * stride_x + k, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + n * stride_w + k, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + n, tl.sum(w * x, 0) * scale)


@triton.jit
def _linear_dot_kernel(X, W, OUT, T, N, K, stride_x, stride_w, stride_o, stride_split, scale,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PER_SPLIT: tl.constexpr,
                       EVEN_K: tl.constexpr, PDL: tl.constexpr):
    """A [BM, BN] tile of x . W^T on the tensor cores (bf16 operands, fp32 accumulation), times scale, over K's
    values [z * PER_SPLIT, (z + 1) * PER_SPLIT) into OUT + z * stride_split, z = program_id(2) (split K: the
    caller sums the partials in order). EVEN_K: the splits cover K exactly (no K mask: asynchronous copies)."""
    pdl_start(PDL)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    k_first = tl.program_id(2) * PER_SPLIT
    x_ptr = X + m.to(tl.int64)[:, None] * stride_x
    w_ptr = W + n.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, PER_SPLIT, BK):
        kk = k_first + k0 + k
        if EVEN_K:
            x = tl.load(x_ptr + kk[None, :], mask=(m < T)[:, None], other=0.0)
            w = tl.load(w_ptr + kk[:, None], mask=(n < N)[None, :], other=0.0)
        else:
            x = tl.load(x_ptr + kk[None, :], mask=(m < T)[:, None] & (kk < K)[None, :], other=0.0)
            w = tl.load(w_ptr + kk[:, None], mask=(n < N)[None, :] & (kk < K)[:, None], other=0.0)
        acc = tl.dot(x, w, acc)
    out = OUT + tl.program_id(2).to(tl.int64) * stride_split + m.to(tl.int64)[:, None] * stride_o + n[None, :]
    tl.store(out, acc * scale, mask=(m < T)[:, None] & (n < N)[None, :])


def linear_fp32(x: Tensor, weight: Tensor, scale: float = 1.0) -> Tensor:
    """x [T, K] . weight [N, K]^T in fp32, times scale (where linear_fp32_applies). Through torch at a few rows
    that is a conversion of x, a cuBLAS GEMV reading the weight at a fraction of copy bandwidth (and a
    multiply): 14.2 us against 7.8 for the router at one row of V3.2 on an H200 (CUDA graph, L2 flushed; 8.2
    with the weight in fp32), 24.1 -> 15.4 us at 16 rows."""
    T, K = x.shape
    N = weight.shape[0]
    out = torch.empty(T, N, dtype=torch.float32, device=x.device)
    if _tensor_cores(x, weight):
        linear_dot(x, weight, out, scale, DOT_TILE)
    else:
        _linear_rows_kernel[(N, T)](x, weight, out, x.stride(0), weight.stride(0), out.stride(0), K, scale,
                                    BLOCK_K=next_pow2(K), num_warps=8, **pdl(x))
    return out


def linear_dot(x: Tensor, weight: Tensor, out: Tensor, scale: float, tile: tuple[int, ...]) -> None:
    """The tensor-core path into out [T, N] (fp32) with a given tile; a split > 1 sums split partials of K."""
    T, K = x.shape
    N = weight.shape[0]
    BM, BN, BK, warps, stages, split = tile
    part = out if split == 1 else torch.empty(split, T, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, BN), triton.cdiv(T, BM), split)
    per_split = triton.cdiv(triton.cdiv(K, BK), split) * BK
    _linear_dot_kernel[grid](x, weight, part, T, N, K, x.stride(0), weight.stride(0), part.stride(-2),
                             part.stride(0) if split > 1 else 0, scale, BM=BM, BN=BN, BK=BK, PER_SPLIT=per_split,
                             EVEN_K=per_split * split == K,
                             num_warps=warps, num_stages=stages, **pdl(x))
    if split > 1:
        torch.sum(part, 0, out=out)


def _tensor_cores(x: Tensor, weight: Tensor) -> bool:
    return x.shape[0] >= DOT_MIN_ROWS and x.dtype == weight.dtype == torch.bfloat16  # (bf16 products exact in fp32)


def linear_fp32_applies(x: Tensor, weight: Tensor) -> bool:
    if not (x.dim() == 2 and x.shape[0] > 0 and x.is_floating_point() and x.stride(1) == weight.stride(1) == 1):
        return False
    return _tensor_cores(x, weight) or (x.shape[0] <= FP32_LINEAR_MAX_ROWS and x.shape[1] <= FP32_LINEAR_MAX_IN
                                        and weight.dtype in (torch.float32, torch.bfloat16))


__all__ = ["DOT_MIN_ROWS", "FP32_LINEAR_MAX_ROWS", "linear_dot", "linear_fp32", "linear_fp32_applies"]
