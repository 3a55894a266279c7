"""Batch-invariant math (--enable-deterministic-inference, CPU): each output row is computed by the same kernel
call on the same operands whatever the other rows of the step, so a request's values do not depend on the batch
around it, on how its prompt was chunked, on speculative verification or on a cached prefix.

What made a row's values follow its neighbours, each measured on CPU:
* a GEMM takes another kernel, and so another reduction order, as its row count changes (fp32 [M, 256] x
  [256, 512]: M = 1, 2-10 and 11+). Here every row is one entry of a batched GEMM of fixed per-entry shape
  ([1, K] x [K, N], the weight broadcast): equal to the row's own product at every batch size and offset.
* with one entry (a step of one row) BLAS threads that GEMM and splits its sum; a reduction over a 32K+ row
  (a vocabulary) splits over threads when it is the only row: the mode's steps run on one thread (one_thread).
* PyTorch's vector loop and its scalar tail round sigmoid, silu or rsqrt apart (2-50% of values, one ulp), so
  in a contiguous tensor a value follows its offset: pointwise() takes the scalar loop throughout.
fp32 only: for bf16 / fp16 CPU matmuls switch to oneDNN by the batch's size (ModelRunner refuses them, and CUDA,
whose kernels choose tiles and splits by row count). On the embedded model prefill costs 2-3.4x, decode 1-2x.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
KEY_BLOCK = 256  # scores take keys this many at a time, so each product's shape is fixed whatever the width


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] times weight [N, K] transposed -> [..., N], one row per entry of a batched GEMM."""
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


def key_blocks(keys: Tensor) -> Tensor:
    """keys [L, D] zero-padded to whole KEY_BLOCKs, for scores()."""
    return F.pad(keys, (0, 0, 0, -keys.shape[0] % KEY_BLOCK))


def scores(q: Tensor, blocks: Tensor, width: int) -> Tensor:
    """q [R, D] . the first `width` keys of key_blocks(keys) -> [R, width], KEY_BLOCK keys per product: a
    position's product has the same shape whatever the width, which follows the step's widest row."""
    parts = [linear(q, blocks[start:start + KEY_BLOCK]) for start in range(0, blocks.shape[0], KEY_BLOCK)]
    return torch.cat(parts, dim=-1)[:, :width] if parts else q.new_zeros(q.shape[0], 0)


def pointwise(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """fn(x) for an elementwise fn, every element through PyTorch's scalar loop on CPU: a strided input (every
    other slot of a buffer) never takes the vector loop. CUDA kernels compute each element alike: fn(x)."""
    if x.is_cuda:
        return fn(x)
    spaced = x.new_empty(*x.shape, 2)[..., 0]
    spaced.copy_(x)
    return fn(spaced)


def ordered_sum(parts: list[Tensor]) -> Tensor:
    """parts[0] + parts[1] + ... in that order, into parts[0] (a collective's ring sums an element's parts in an
    order that follows the buffer's size, and so the batch)."""
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """PyTorch's intra-op threads set to one inside (no GEMM or reduction split over threads), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
