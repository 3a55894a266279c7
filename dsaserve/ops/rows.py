"""Row-invariant math (--enable-deterministic-inference): each output row is computed by the same kernel call on
the same operands whatever the other rows of the step, so a request's values do not depend on the batch around
it, on how its prompt was chunked, on speculative verification or on a cached prefix. The products here run
in that mode only (a product about 7x slower on CPU, a step of the embedded model 2-2.4x); `pointwise` always, where the reference ops take sigmoid, silu, exp
and cos / sin (it costs little).

A GEMM may take another kernel, and so another reduction order, as its row count changes: CPU BLAS did, measured,
for an fp32 [M, 256] x [256, 512] product between M = 1, 2-10 and 11+. Here every row is one entry of a batched
GEMM whose per-entry shape is fixed ([1, K] x [K, N]); measured equal to the row's own product at every batch size
and row offset. CPU only: cuBLAS chooses an algorithm for the whole batch (ModelRunner refuses the mode on CUDA).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
KEY_BLOCK = 256  # scores() takes keys this many at a time, so each product's shape is fixed whatever the width


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] times weight [N, K] transposed -> [..., N], one row per entry of a batched GEMM (the weight
    broadcast, not copied)."""
    rows = x.reshape(-1, x.shape[-1])
    w_t = weight.transpose(0, 1)
    out = torch.bmm(rows[:, None, :], w_t.expand(rows.shape[0], *w_t.shape))
    return out.view(*x.shape[:-1], weight.shape[0])


def per_head(x: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """x [T, H, A] times each head's w [H, A, B] -> [T, H, B] (into `out` when given)."""
    T, H = x.shape[:2]
    out = x.new_empty(T, H, w.shape[2]) if out is None else out
    for h in range(H):
        out[:, h] = linear(x[:, h], w[h].transpose(0, 1))
    return out


def scores(q: Tensor, keys: Tensor) -> Tensor:
    """q [R, D] . keys [L, D] -> [R, L], the keys taken KEY_BLOCK at a time (zero-padded): a position's product
    has the same shape whatever L, which follows the widest row of the step."""
    L = keys.shape[0]
    padded = F.pad(keys, (0, 0, 0, -L % KEY_BLOCK))
    parts = [linear(q, padded[start:start + KEY_BLOCK]) for start in range(0, padded.shape[0], KEY_BLOCK)]
    return torch.cat(parts, dim=-1)[:, :L] if parts else q.new_zeros(q.shape[0], 0)


def pointwise(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """fn(x) for an elementwise fn, each element through PyTorch's scalar loop on CPU. Its vector loop and the
    scalar tail after it round sigmoid, silu or rsqrt differently (measured: 2-50% of values, one ulp apart), so
    in a contiguous tensor a value would follow its offset, that is the rows before it. A strided input (every
    other slot of a buffer) takes the scalar loop throughout. CUDA kernels compute each element alike: fn(x)."""
    if x.is_cuda:
        return fn(x)
    spaced = x.new_empty(*x.shape, 2)[..., 0]
    spaced.copy_(x)
    return fn(spaced)


def ordered_sum(parts: list[Tensor]) -> Tensor:
    """parts[0] + parts[1] + ... in that order, into parts[0] (a collective's ring sums elements in an order
    that follows the buffer's size, and so the batch)."""
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total
