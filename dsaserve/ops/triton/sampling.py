"""Sampling of the non-greedy rows: temperature, top-k / top-p / min-p, and the inverse-CDF draw, each row split
over chunks of the vocabulary (one program per chunk: a 129K row is 16 programs, not one).

Weights are w = exp((x - max) / T) over the row, Z their sum. A filtered row keeps the tokens of w >= t, t the
largest value with count(w >= t) >= top_k or mass(w >= t) >= top_p Z, raised to min_p (w is 1 at the max);
every token at the threshold stays. Three launches:

1. per chunk: its max, its weights' sum, and under top-k an element with at least top_k of the chunk's at or
   above it (the k-th largest's lower bound, by a short bisection in registers);
2. per chunk, from all chunks' figures: the row's max and Z, and a floor the threshold cannot be under (min_p;
   under top-p (1 - top_p) Z / 2V: the weights below it hold under half the mass top-p leaves out; under top-k
   the largest chunk bound); the chunk's weights at or above the floor are written, in vocabulary order with
   their ids, at the start of the chunk's scratch (a few tokens of 8K on most rows);
3. per row: t by bisection on the float bits over those candidates (held in registers when they fit), the
   chunk whose running sum of kept mass passes u times the total, and the token inside it.

Unfiltered rows skip the candidates: the draw picks the chunk from the chunk sums and scans it. The reference
is dsaserve.engine.sampler.filter_probs + draw, which keep the same set (the torch code sorts the vocabulary
and cumulates it in fp64). Sums run in a fixed order per row: a row's token depends on its logits and uniform
only, never on the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.triton._common import pdl, pdl_start

Tensor = torch.Tensor
CHUNK = 8192  # vocabulary entries per program of the first two launches, and the draw's scan
CHUNK_WARPS = 8
TILE = 8192  # candidates the draw holds in registers at once: [chunks, TILE / chunks]
DRAW_WARPS = 8
SELECT_STEPS = 16  # bisection steps of a chunk's top-k bound: past the exponent, 8 bits of mantissa
STATS = 3  # per chunk: max logit, sum of weights relative to it, top-k bound (a logit)
_LOG2E = 1.4426950408889634
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _row_params(PARAMS, i):
    """(logits row, log2(e) / T, top_k (0: off), top_p (1: off), min_p (0: off), uniform) of parameter row i."""
    base = PARAMS + i * 6
    return (tl.load(base).to(tl.int64), tl.load(base + 1).to(tl.float32), tl.load(base + 2).to(tl.int32),
            tl.load(base + 3).to(tl.float32), tl.load(base + 4).to(tl.float32), tl.load(base + 5))


@triton.jit
def _chunk_logits(X, stride_x, row, c, V, CHUNK: tl.constexpr):
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(X + row * stride_x + offs, mask=offs < V, other=float("-inf"))
    # A NaN logit is never drawn (its chunk's others still are); +inf reads as the largest float, so the row's
    # +inf tokens share its mass (inf - inf was NaN: the row drew token 0), as the reference's.
    return tl.minimum(tl.where(x == x, x, float("-inf")), _FLOAT32_MAX), offs


@triton.jit(do_not_specialize=["V", "stride_x", "C"])
def _chunk_stats_kernel(X, stride_x, PARAMS, STAT, V, C, CHUNK: tl.constexpr, SELECT_STEPS: tl.constexpr,
                        PDL: tl.constexpr):
    pdl_start(PDL)
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    row, scale, top_k, top_p, min_p, u = _row_params(PARAMS, i)
    x, offs = _chunk_logits(X, stride_x, row, c, V, CHUNK)
    top = tl.max(x, 0)
    w = tl.exp2((x - tl.where(top == float("-inf"), 0.0, top)) * scale)
    bound = scale * 0.0 - float("inf")  # no bound
    if (top_k > 0) & (top_k <= CHUNK):
        lo = tl.program_id(0) * 0  # bits of a weight with >= top_k of the chunk's at or above it (0 has all)
        hi = lo + 0x3F800001  # bits of one without (no weight is above 1)
        for _ in range(SELECT_STEPS):
            mid = lo + (hi - lo) // 2
            passes = tl.sum((w >= mid.to(tl.float32, bitcast=True)).to(tl.int32), 0) >= top_k
            lo = tl.where(passes, mid, lo)
            hi = tl.where(passes, hi, mid)
        bound = tl.min(tl.where(w >= lo.to(tl.float32, bitcast=True), x, float("inf")), 0)
    out = STAT + (i * C + c) * 3
    tl.store(out, top)
    tl.store(out + 1, tl.sum(w, 0))
    tl.store(out + 2, bound)


@triton.jit
def _row_totals(STAT, i, C, scale, CMAX: tl.constexpr):
    """(the row's max logit (0 for a row of -inf), each chunk's mass in the row's weights [CMAX], their sum Z,
    the largest chunk top-k bound)."""
    cs = tl.arange(0, CMAX)
    at = STAT + (i * C + cs) * 3
    tops = tl.load(at, mask=cs < C, other=float("-inf"))
    sums = tl.load(at + 1, mask=cs < C, other=0.0)
    bounds = tl.load(at + 2, mask=cs < C, other=float("-inf"))
    m = tl.max(tops, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    masses = tl.where(sums > 0.0, sums * tl.exp2((tops - m) * scale), 0.0)  # (a chunk with a finite max sums >= 1)
    return m, masses, tl.sum(masses, 0), tl.max(bounds, 0)


@triton.jit
def _floor(m, z, bound, scale, top_k, top_p, min_p, V, CHUNK: tl.constexpr):
    """A weight the row's threshold is at or above (0: no floor). Past top_p 0.999 the half's margin nears
    fp32's rounding of Z."""
    floor = min_p
    if top_p <= 0.999:
        floor = tl.maximum(floor, (1.0 - top_p) * z / (2.0 * V))
    if (top_k > 0) & (top_k <= CHUNK):
        floor = tl.maximum(floor, tl.exp2((bound - m) * scale))
    return floor


@triton.jit
def _filtered(top_k, top_p, min_p):
    return (top_k > 0) | (top_p < 1.0) | (min_p > 0.0)


@triton.jit(do_not_specialize=["V", "stride_x", "C"])
def _candidates_kernel(X, stride_x, PARAMS, STAT, COUNT, W, IDS, V, C, CHUNK: tl.constexpr, CMAX: tl.constexpr,
                       PDL: tl.constexpr):
    pdl_start(PDL)
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    row, scale, top_k, top_p, min_p, u = _row_params(PARAMS, i)
    n = tl.program_id(0) * 0
    if _filtered(top_k, top_p, min_p):
        m, masses, z, bound = _row_totals(STAT, i, C, scale, CMAX)
        floor = _floor(m, z, bound, scale, top_k, top_p, min_p, V, CHUNK)
        x, offs = _chunk_logits(X, stride_x, row, c, V, CHUNK)
        w = tl.exp2((x - m) * scale)
        keep = (w >= floor) & (w > 0.0) & (offs < V)  # (zeros never drawn: a floor of 0 keeps the others; NaN none)
        at = i * V + c * CHUNK + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(W + at, w, mask=keep)
        tl.store(IDS + at, offs, mask=keep)
        n = tl.sum(keep.to(tl.int32), 0)
    tl.store(COUNT + i * C + c, n)


@triton.jit
def _kept(W, i, V, counts, most, v, CHUNK: tl.constexpr, CMAX: tl.constexpr, G: tl.constexpr):
    """(count, mass) of the candidates >= v and each chunk's kept mass [CMAX], over the [CMAX, G] tiles."""
    cs = tl.arange(0, CMAX)
    count = tl.zeros([CMAX, G], tl.int32)
    mass = tl.zeros([CMAX, G], tl.float32)
    for s in range(0, most, G):
        j = s + tl.arange(0, G)
        inside = j[None, :] < counts[:, None]
        w = tl.load(W + i * V + cs[:, None] * CHUNK + j[None, :], mask=inside, other=-1.0)
        keep = w >= v
        count += keep.to(tl.int32)
        mass += tl.where(keep, w, 0.0)
    return tl.sum(tl.sum(count, 1), 0), tl.sum(tl.sum(mass, 1), 0), tl.sum(mass, 1)


@triton.jit
def _passes(count, mass, z, top_k, top_p):
    return ((top_k > 0) & (count >= top_k)) | ((top_p < 1.0) & (mass >= top_p * z))


@triton.jit
def _add_pairs(count_a, mass_a, count_b, mass_b):
    return count_a + count_b, mass_a + mass_b


@triton.jit
def _threshold(W, COUNT, i, V, C, counts, most, z, top_k, top_p, CHUNK: tl.constexpr, CMAX: tl.constexpr,
               G: tl.constexpr):
    """The largest weight v with count(w >= v) >= top_k or mass(w >= v) >= top_p Z, by bisection on the float
    bits; the candidates stay in registers (one flat block, count and mass in one reduction) when every chunk's
    fit its G columns."""
    lo = tl.program_id(0) * 0  # bits of a value that passes (every weight is >= 0)
    hi = lo + 0x3F800001  # bits of one that does not (float32 1.0 + 1 ulp)
    if most <= G:
        f = tl.arange(0, CMAX * G)
        c, j = f // G, f % G
        w = tl.load(W + i * V + c * CHUNK + j, mask=j < tl.load(COUNT + i * C + c, mask=c < C, other=0), other=-1.0)
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            keep = w >= mid.to(tl.float32, bitcast=True)
            count, mass = tl.reduce((keep.to(tl.int32), tl.where(keep, w, 0.0)), 0, _add_pairs)
            passes = _passes(count, mass, z, top_k, top_p)
            lo = tl.where(passes, mid, lo)
            hi = tl.where(passes, hi, mid)
    else:
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            count, mass, _ = _kept(W, i, V, counts, most, mid.to(tl.float32, bitcast=True), CHUNK, CMAX, G)
            passes = _passes(count, mass, z, top_k, top_p)
            lo = tl.where(passes, mid, lo)
            hi = tl.where(passes, hi, mid)
    return lo.to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["V", "stride_x", "C"])
def _draw_kernel(X, stride_x, PARAMS, STAT, COUNT, W, IDS, OUT, V, C, CHUNK: tl.constexpr, CMAX: tl.constexpr,
                 G: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    i = tl.program_id(0).to(tl.int64)
    row, scale, top_k, top_p, min_p, u = _row_params(PARAMS, i)
    m, masses, z, bound = _row_totals(STAT, i, C, scale, CMAX)
    cs = tl.arange(0, CMAX)
    filtered = _filtered(top_k, top_p, min_p)
    t = min_p
    counts = tl.zeros([CMAX], tl.int32)
    if filtered:
        counts = tl.load(COUNT + i * C + cs, mask=cs < C, other=0)
        most = tl.max(counts, 0)
        if (top_k > 0) | (top_p < 1.0):
            t = tl.maximum(t, _threshold(W, COUNT, i, V, C, counts, most, z, top_k, top_p, CHUNK, CMAX, G))
        _, _, masses = _kept(W, i, V, counts, most, t, CHUNK, CMAX, G)
    # The chunk where the running kept mass passes u x its total (rounded past the total: the last chunk
    # with mass), then the first token in it that does.
    target = u * tl.sum(masses, 0).to(tl.float64)
    before = tl.cumsum(masses.to(tl.float64), 0)
    pick = tl.min(tl.where(before > target, cs, CMAX), 0)
    pick = tl.where(pick < CMAX, pick, tl.max(tl.where(masses > 0.0, cs, -1), 0))
    run = tl.sum(tl.where(cs < pick, masses, 0.0).to(tl.float64), 0)
    chunk = tl.maximum(pick, 0)  # (pick -1: no chunk has mass, a row of -inf or NaN)
    k = tl.arange(0, CHUNK)
    if filtered:
        w = tl.load(W + i * V + chunk * CHUNK + k, mask=k < tl.sum(tl.where(cs == pick, counts, 0), 0), other=0.0)
        w = tl.where(w >= t, w, 0.0)
    else:
        x, _ = _chunk_logits(X, stride_x, row, chunk, V, CHUNK)
        w = tl.where(pick >= 0, tl.exp2((x - m) * scale), 0.0)
    passed = (run + tl.cumsum(w, 0).to(tl.float64) > target) & (w > 0)
    at = tl.min(tl.where(passed, k, CHUNK), 0)
    at = tl.where(at < CHUNK, at, tl.max(tl.where(w > 0, k, -1), 0))  # (rounded past: the chunk's last kept)
    token = chunk * CHUNK + at
    if filtered:
        token = tl.load(IDS + i * V + chunk * CHUNK + tl.maximum(at, 0), mask=at >= 0, other=0)
    token = tl.where(at >= 0, token, 0)  # none kept (a row of -inf or NaN): token 0
    tl.store(OUT + row + tl.arange(0, 1), token.to(tl.int64))


def sample_rows(logits: Tensor, params: Tensor, out: Tensor, filtered: bool = True) -> None:
    """Write the sampled token of each row described by `params` ([R, 6] float64 on the device: logits row,
    log2(e) / temperature, top_k (0: off), top_p (1: off), min_p (0: off), the row's uniform in [0, 1))
    into out[row]. logits: [B, V] fp32 with unit stride along V. filtered: some row has top-k, top-p or
    min-p (False skips the candidates' launch and scratch; it must be True where one has)."""
    R, V = params.shape[0], logits.shape[1]
    if R == 0:
        return
    C = triton.cdiv(V, CHUNK)
    cmax = max(2, triton.next_power_of_2(C))
    dev = logits.device
    stat = torch.empty(R, C, STATS, dtype=torch.float32, device=dev)
    count = torch.empty(R, C, dtype=torch.int32, device=dev)
    weights = torch.empty(R * V if filtered else 1, dtype=torch.float32, device=dev)
    ids = torch.empty(R * V if filtered else 1, dtype=torch.int32, device=dev)
    launch = pdl(logits)
    _chunk_stats_kernel[(R, C)](logits, logits.stride(0), params, stat, V, C, CHUNK=CHUNK,
                                SELECT_STEPS=SELECT_STEPS, num_warps=CHUNK_WARPS, **launch)
    if filtered:
        _candidates_kernel[(R, C)](logits, logits.stride(0), params, stat, count, weights, ids, V, C, CHUNK=CHUNK,
                                   CMAX=cmax, num_warps=CHUNK_WARPS, **launch)
    _draw_kernel[(R,)](logits, logits.stride(0), params, stat, count, weights, ids, out, V, C, CHUNK=CHUNK,
                       CMAX=cmax, G=max(1, TILE // cmax), num_warps=DRAW_WARPS, **launch)


def row_params(rows: list[int], temperature: list[float], top_k: list[int], top_p: list[float],
               min_p: list[float], uniforms: list[float], device: torch.device) -> Tensor:
    """The [R, 6] float64 parameter rows sample_rows reads, copied to the device in one transfer."""
    host = torch.tensor([[r, _LOG2E / t, k, p, mp, u] for r, t, k, p, mp, u
                         in zip(rows, temperature, top_k, top_p, min_p, uniforms)], dtype=torch.float64)
    return host.to(device, non_blocking=True)


__all__ = ["row_params", "sample_rows"]
