"""Sampling of the non-greedy rows in one launch: temperature, top-k / top-p / min-p, and the inverse-CDF draw.

One program per row: the row's max, its weights w = exp((x - max) / T) and their sum Z; the weights at or
above a floor the threshold cannot be under (min_p; under top-p a share of Z / V) written to a scratch row
with their ids; when top-k or top-p is asked, the threshold t = the largest value with count(w >= t) >= top_k
or mass(w >= t) >= top_p * Z, found by bisection on the float bits (at most 30 passes over the scratch row,
no sort); t is raised to min_p (w is 1 at the max); then the first index whose running sum of kept weights
(w >= t) passes u times their total. The reference is dsaserve.engine.sampler.filter_probs + draw, which
keep the same set (every token at the threshold, ties included): the torch code sorts the vocabulary and
cumulates it in fp64 (over a 129K vocabulary, 0.6-2.5 ms per step on the H200, most of it the single-block
scans). Sums here run in a fixed order per row (vector accumulators, then one reduction): a row's token
depends on its logits and uniform only, never on the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.triton._common import pdl, pdl_start

Tensor = torch.Tensor
BLOCK = 8192  # (16 warps: 8192 x 16 beat 4096 x 8 and 16384 x 16 or 32 on an H100 at 1-64 rows)
NUM_WARPS = 16
_LOG2E = 1.4426950408889634


@triton.jit
def _kept_stats(W, n, v, BLOCK: tl.constexpr):
    """(count, mass) of the scratch row's n weights >= v."""
    count = tl.zeros([BLOCK], tl.int32)
    mass = tl.zeros([BLOCK], tl.float32)
    for s in range(0, n, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        w = tl.load(W + offs, mask=offs < n, other=-1.0)
        keep = w >= v
        count += keep.to(tl.int32)
        mass += tl.where(keep, w, 0.0)
    return tl.sum(count, 0), tl.sum(mass, 0)


@triton.jit
def _weights(x_row, s, m, scale, V, BLOCK: tl.constexpr):
    """Block s of the row's weights exp((x - max) / T) (0 past V) and their offsets."""
    offs = s + tl.arange(0, BLOCK)
    return tl.exp2((tl.load(x_row + offs, mask=offs < V, other=float("-inf")) - m) * scale), offs


@triton.jit(do_not_specialize=["V", "stride_x"])
def _sample_kernel(X, stride_x, PARAMS, W, IDS, OUT, V, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(PARAMS + i * 6).to(tl.int64)  # params: row, log2(e) / T, top_k (0: off), top_p, min_p, u
    scale = tl.load(PARAMS + i * 6 + 1).to(tl.float32)
    top_k = tl.load(PARAMS + i * 6 + 2).to(tl.int32)
    top_p = tl.load(PARAMS + i * 6 + 3).to(tl.float32)
    min_p = tl.load(PARAMS + i * 6 + 4).to(tl.float32)
    u = tl.load(PARAMS + i * 6 + 5)
    x_row = X + row * stride_x
    w_row = W + i * V
    id_row = IDS + i * V
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    for s in range(0, V, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        best = tl.maximum(best, tl.load(x_row + offs, mask=offs < V, other=float("-inf")))
    m = tl.max(best, 0)
    total = tl.zeros([BLOCK], tl.float32)
    for s in range(0, V, BLOCK):
        w, offs = _weights(x_row, s, m, scale, V, BLOCK)
        tl.store(w_row + offs, w, mask=offs < V)
        total += w
    z = tl.sum(total, 0)
    # The threshold is at least min_p (w is 1 at the max) and, under top_p, (1 - top_p) z / 2V: the weights
    # below that hold under half the mass top-p leaves out. Above a floor of 0 the scratch row keeps only the
    # weights at or over it, in vocabulary order with their ids, and the search and the draw read those alone
    # (a few hundred of 129K on a sharp row). Past top_p 0.999 the half's margin nears fp32's rounding.
    floor = min_p
    if top_p <= 0.999:
        floor = tl.maximum(floor, (1.0 - top_p) * z / (2.0 * V))
    n = tl.program_id(0) * 0 + V
    compact = floor > 0.0
    if compact:  # (from the logits: the writes land at or before each block's own place in the row)
        tl.debug_barrier()  # (after the weights' stores above, which these overwrite)
        n = tl.program_id(0) * 0
        for s in range(0, V, BLOCK):
            w, offs = _weights(x_row, s, m, scale, V, BLOCK)
            keep = w >= floor  # (NaN weights of a NaN or all -inf row: none kept)
            at = n + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(w_row + at, w, mask=keep)
            tl.store(id_row + at, offs, mask=keep)
            n += tl.sum(keep.to(tl.int32), 0)
    tl.debug_barrier()  # the scratch row is read below by other threads of this program than wrote it
    t = min_p
    if (top_k > 0) | (top_p < 1.0):
        lo = tl.program_id(0) * 0  # bits of a value that passes (every weight is >= 0)
        hi = lo + 0x3F800001  # bits of one that does not (float32 1.0 + 1 ulp: no weight is above 1)
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            count, mass = _kept_stats(w_row, n, mid.to(tl.float32, bitcast=True), BLOCK)
            passes = ((top_k > 0) & (count >= top_k)) | ((top_p < 1.0) & (mass >= top_p * z))
            lo = tl.where(passes, mid, lo)
            hi = tl.where(passes, hi, mid)
        t = tl.maximum(t, lo.to(tl.float32, bitcast=True))
    kept_total = z  # (no threshold and the whole row: every weight, summed in the same order)
    if (t > 0.0) | compact:
        kept = tl.zeros([BLOCK], tl.float32)
        for s in range(0, n, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            w = tl.load(w_row + offs, mask=offs < n, other=0.0)
            kept += tl.where(w >= t, w, 0.0)
        kept_total = tl.sum(kept, 0)
    target = u * kept_total.to(tl.float64)
    run = tl.zeros([1], tl.float64)
    pick = tl.zeros([1], tl.int32) + n
    last = tl.full([1], -1, tl.int32)
    for s in range(0, n, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        w = tl.load(w_row + offs, mask=offs < n, other=0.0)
        w = tl.where(w >= t, w, 0.0)
        passed = (run + tl.cumsum(w, 0).to(tl.float64) > target) & (w > 0)
        pick = tl.minimum(pick, tl.min(tl.where(passed, offs, n), 0))
        last = tl.maximum(last, tl.max(tl.where(w > 0, offs, -1), 0))
        run += tl.sum(w, 0).to(tl.float64)
    # u x total rounded up to the total: the last kept token; none kept (a row of -inf or NaN): token 0
    at = tl.where(pick < n, pick, last)
    token = at
    if compact:
        token = tl.load(id_row + tl.maximum(at, 0), mask=at >= 0, other=0)
    token = tl.maximum(token, 0)
    tl.store(OUT + row + tl.arange(0, 1), token.to(tl.int64))


def sample_rows(logits: Tensor, params: Tensor, out: Tensor) -> None:
    """Write the sampled token of each row described by `params` ([R, 6] float64 on the device: logits row,
    log2(e) / temperature, top_k (0: off), top_p (1: off), min_p (0: off), the row's uniform in [0, 1))
    into out[row]. logits: [B, V] fp32 with unit stride along V."""
    R, V = params.shape[0], logits.shape[1]
    if R == 0:
        return
    weights = torch.empty(R, V, dtype=torch.float32, device=logits.device)
    ids = torch.empty(R, V, dtype=torch.int32, device=logits.device)
    _sample_kernel[(R,)](logits, logits.stride(0), params, weights, ids, out, V, BLOCK=BLOCK, num_warps=NUM_WARPS,
                         **pdl(logits))


def row_params(rows: list[int], temperature: list[float], top_k: list[int], top_p: list[float],
               min_p: list[float], uniforms: list[float], device: torch.device) -> Tensor:
    """The [R, 6] float64 parameter rows sample_rows reads, copied to the device in one transfer."""
    host = torch.tensor([[r, _LOG2E / t, k, p, mp, u] for r, t, k, p, mp, u
                         in zip(rows, temperature, top_k, top_p, min_p, uniforms)], dtype=torch.float64)
    return host.to(device, non_blocking=True)


__all__ = ["row_params", "sample_rows"]
