"""Sampling of the non-greedy rows: temperature, top-k / top-p / min-p, and the inverse-CDF draw, spread over
the whole GPU (each row's vocabulary in chunks of CHUNK positions, one program per chunk).

A row's weights are w = exp((x - max) / T) (w is 1 at the max; recomputed from the logits where needed, never
stored). The kept set is {w >= t}: t is the largest value with count(w >= t) >= top_k or mass(w >= t) >=
top_p * Z, raised to min_p. t is found on its float bits (weights are in [0, 1], where float order is integer
order): the search interval [lo, hi) starts at [bits(min_p), bits(1) + 1) and each pass cuts it at CUTS
points, every chunk counting its weights at or above each cut (count, mass). The row's last program to finish
a pass adds the chunks' counts in a fixed order, keeps the sub-interval whose lower cut still passes and
writes it for the next pass. Passes of log2(CUTS) bits resolve the 30 bits of t exactly. Only pass 0 reads
every weight: pass 1 writes the few inside its interval (in order) to the chunk's list and counts those above
it once, and later passes read the list alone. The draw adds the chunks' kept mass in fp64, in order, finds the chunk where u x total falls
and scans that chunk alone.

Launches: the chunks' maxima, the passes (one when no row asks for top-k or top-p), the draw. Every sum runs
in a fixed order within a row, so a row's token depends on its logits and uniform only, never on the batch.
The reference is dsaserve.engine.sampler.filter_probs + draw, which keep the same set (every token at the
threshold, ties included).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.triton._common import next_pow2

Tensor = torch.Tensor
CHUNK = 4096  # vocabulary positions per program (129,280: 32 chunks, so one row alone spreads over 32 SMs)
SUB = 256  # positions per step of a program: a [CUTS, SUB] comparison tile
CUTS = 8  # cut points per pass: 3 bits of the threshold (a power of two)
THRESHOLD_BITS = 30  # bits(1.0) + 1 < 2 ** 30: the passes resolve every bit of the threshold
# Tuning override for benchmarks: dict with any of chunk, sub, cuts, num_warps.
CONFIG: dict[str, int] | None = None
_ONE_UP = tl.constexpr(0x3F800001)  # float32 bits of 1.0 + 1 ulp: no weight is at or above it
_LOG2E = 1.4426950408889634
_NO_K = 1 << 30  # top_k off: more tokens than any vocabulary has
_NO_P = 2.0  # top_p off: more than the whole mass
_P = tl.constexpr(7)  # parameters per sampled row, see row_params


@triton.jit
def _row_max(MAXES, i, C, BLOCK_C: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    return tl.max(tl.load(MAXES + i * C + c, mask=c < C, other=float("-inf")), 0)


@triton.jit
def _weights(x_row, offs, V, m, scale):
    """The weights at offs; -1 for positions past V and for NaN logits (never counted, never kept)."""
    w = tl.exp2((tl.load(x_row + offs, mask=offs < V, other=float("-inf")) - m) * scale)
    return tl.where((offs < V) & (w == w), w, -1.0)


@triton.jit
def _cuts(lo, hi, CUTS: tl.constexpr):
    """CUTS int64 float bits from lo up, splitting [lo, hi) into near-equal parts (equal cuts when it is short)."""
    return lo + ((hi - lo) * tl.arange(0, CUTS).to(tl.int64)) // CUTS


@triton.jit
def _decide(COUNTS, MASSES, BOUNDS, p, i, R, C, top_k, top_p, z, CUTS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass p's interval and counts of row i -> (lo, hi, j): the sub-interval [lo, hi) that holds the threshold
    and the index j of its lower cut (lo = cut j passes; the cut above it, if any, does not)."""
    lo = tl.load(BOUNDS + (p * R + i) * 2, cache_modifier=".cg")  # other programs' stores: not from L1
    hi = tl.load(BOUNDS + (p * R + i) * 2 + 1, cache_modifier=".cg")
    # top_k off is a count no row reaches, top_p off a mass above the total; cut 0 is lo, which passes
    c = tl.arange(0, BLOCK_C)[:, None]
    j = tl.arange(0, CUTS)[None, :]
    at = ((p * R + i) * C + c) * CUTS + j
    count = tl.sum(tl.load(COUNTS + at, mask=c < C, other=0, cache_modifier=".cg"), 0)
    mass = tl.sum(tl.load(MASSES + at, mask=c < C, other=0.0, cache_modifier=".cg"), 0)
    jj = tl.arange(0, CUTS)
    passes = (count >= top_k) | (mass >= top_p * z) | (jj == 0)
    best = tl.max(tl.where(passes, jj, 0), 0)
    cuts = _cuts(lo, hi, CUTS)
    new_lo = tl.sum(tl.where(jj == best, cuts, 0), 0)
    new_hi = tl.where(best == CUTS - 1, hi, tl.sum(tl.where(jj == best + 1, cuts, 0), 0))
    return new_lo, new_hi, best


@triton.jit
def _load_params(PARAMS, i):
    row = tl.load(PARAMS + i * _P).to(tl.int64)
    scale = tl.load(PARAMS + i * _P + 1).to(tl.float32)
    top_k = tl.load(PARAMS + i * _P + 2).to(tl.int32)
    top_p = tl.load(PARAMS + i * _P + 3).to(tl.float32)
    min_p = tl.load(PARAMS + i * _P + 4).to(tl.float32)
    search = tl.load(PARAMS + i * _P + 6).to(tl.int32)
    return row, scale, top_k, top_p, min_p, search


@triton.jit
def _row_total(TOTALS, i, C, BLOCK_C: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    return tl.sum(tl.load(TOTALS + i * C + c, mask=c < C, other=0.0, cache_modifier=".cg"), 0)


@triton.jit(do_not_specialize=["V", "stride_x", "C", "passes"])
def _max_kernel(X, stride_x, PARAMS, MAXES, TICKETS, V, C, passes, CHUNK: tl.constexpr, SUB: tl.constexpr,
                BLOCK_P: tl.constexpr):
    c = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    if c == 0:  # the row's pass tickets start at 0 (also on every CUDA-graph replay)
        tl.store(TICKETS + i * passes + tl.arange(0, BLOCK_P), 0, mask=tl.arange(0, BLOCK_P) < passes)
    row = tl.load(PARAMS + i * _P).to(tl.int64)
    best = tl.full([SUB], float("-inf"), tl.float32)
    for s in range(0, CHUNK, SUB):
        offs = c * CHUNK + s + tl.arange(0, SUB)
        x = tl.load(X + row * stride_x + offs, mask=offs < V, other=float("-inf"))
        best = tl.maximum(best, tl.where(x == x, x, float("-inf")))  # NaN is not a token: no weight above 1
    tl.store(MAXES + i * C + c, tl.max(best, 0))


@triton.jit
def _tally(w, cut, count, mass):
    """Add the weights at or above each cut: [CUTS, SUB] counts and masses, reduced once per program."""
    keep = w[None, :] >= cut[:, None]
    return count + keep.to(tl.int32), mass + tl.where(keep, w[None, :], 0.0)


@triton.jit(do_not_specialize=["V", "stride_x", "R", "C", "p", "passes"])
def _pass_kernel(X, stride_x, PARAMS, MAXES, TOTALS, COUNTS, MASSES, BOUNDS, LIST, LIST_N, BASE_N, BASE_M, TICKETS,
                 V, R, C, p, passes, CHUNK: tl.constexpr, SUB: tl.constexpr, CUTS: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Pass p: count this chunk's weights at the cuts of pass p's interval; the row's last program to finish
    (an atomic ticket after its stores) adds every chunk's counts in order and writes pass p + 1's interval.

    Pass 0 counts every weight. Pass 1 counts the weights above its interval once (BASE_N, BASE_M) and writes
    those inside it, in order, to the chunk's list (usually a few percent of the chunk); passes 1 and later
    count the list alone (a weight above the interval counts at every cut)."""
    c = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    row, scale, top_k, top_p, min_p, search = _load_params(PARAMS, i)
    if (search == 0) & (p > 0):  # no top-k or top-p in this row: min_p alone sets its threshold
        return
    if p == 0:  # [min_p, 1]
        lo = min_p.to(tl.int32, bitcast=True).to(tl.int64)
        hi = lo * 0 + _ONE_UP
        if c == 0:
            tl.store(BOUNDS + i * 2, lo)
            tl.store(BOUNDS + i * 2 + 1, hi)
    else:  # decided by pass p - 1's last program
        lo = tl.load(BOUNDS + (p * R + i) * 2)
        hi = tl.load(BOUNDS + (p * R + i) * 2 + 1)
    cut = _cuts(lo, hi, CUTS).to(tl.int32).to(tl.float32, bitcast=True)
    lo_f = lo.to(tl.int32).to(tl.float32, bitcast=True)
    hi_f = hi.to(tl.int32).to(tl.float32, bitcast=True)
    m = _row_max(MAXES, i, C, BLOCK_C)
    x_row = X + row * stride_x
    chunk = i * C + c
    list_row = LIST + chunk * CHUNK
    count = tl.zeros([CUTS, SUB], tl.int32)
    mass = tl.zeros([CUTS, SUB], tl.float32)
    above_n = tl.zeros([SUB], tl.int32)  # pass 0 without a search: the weights >= min_p; pass 1: above hi
    above_m = tl.zeros([SUB], tl.float32)
    n = c * 0  # the list's length
    if p == 0:
        total = tl.zeros([SUB], tl.float32)
        for s in range(0, CHUNK, SUB):
            w = _weights(x_row, c * CHUNK + s + tl.arange(0, SUB), V, m, scale)
            if search != 0:
                count, mass = _tally(w, cut, count, mass)
            else:  # every cut is min_p
                keep = w >= lo_f
                above_n += keep.to(tl.int32)
                above_m += tl.where(keep, w, 0.0)
            total += tl.maximum(w, 0.0)
        tl.store(TOTALS + chunk, tl.sum(total, 0))
    elif p == 1:
        for s in range(0, CHUNK, SUB):
            w = _weights(x_row, c * CHUNK + s + tl.arange(0, SUB), V, m, scale)
            above = w >= hi_f
            above_n += above.to(tl.int32)
            above_m += tl.where(above, w, 0.0)
            inside = (w >= lo_f) & (w < hi_f)
            slots = n + tl.cumsum(inside.to(tl.int32), 0) - 1
            tl.store(list_row + slots, w, mask=inside)
            n += tl.sum(inside.to(tl.int32), 0)
        tl.store(LIST_N + chunk, n)
        tl.store(BASE_N + chunk, tl.sum(above_n, 0))
        tl.store(BASE_M + chunk, tl.sum(above_m, 0))
        tl.debug_barrier()  # the list is read back below by other threads than wrote it
    else:
        n = tl.load(LIST_N + chunk)
    for s in range(0, n, SUB):
        offs = s + tl.arange(0, SUB)
        count, mass = _tally(tl.load(list_row + offs, mask=offs < n, other=-1.0), cut, count, mass)
    if p == 0:
        base_n = tl.sum(above_n, 0)
        base_m = tl.sum(above_m, 0)
    else:  # the weights above pass 1's interval: at or above every later cut
        base_n = tl.load(BASE_N + chunk)
        base_m = tl.load(BASE_M + chunk)
    at = ((p * R + i) * C + c) * CUTS + tl.arange(0, CUTS)
    tl.store(COUNTS + at, tl.sum(count, 1) + base_n)
    tl.store(MASSES + at, tl.sum(mass, 1) + base_m)
    if (search != 0) & (p + 1 < passes):
        tl.debug_barrier()  # every thread's stores precede the ticket (an acq_rel atomic at GPU scope)
        if tl.atomic_add(TICKETS + i * passes + p, 1) == C - 1:
            lo, hi, _ = _decide(COUNTS, MASSES, BOUNDS, p, i, R, C, top_k, top_p, _row_total(TOTALS, i, C, BLOCK_C),
                                CUTS, BLOCK_C)
            tl.store(BOUNDS + ((p + 1) * R + i) * 2, lo)
            tl.store(BOUNDS + ((p + 1) * R + i) * 2 + 1, hi)


@triton.jit(do_not_specialize=["V", "stride_x", "R", "C", "last"])
def _draw_kernel(X, stride_x, PARAMS, MAXES, MASSES, COUNTS, TOTALS, BOUNDS, OUT, V, R, C, last,
                 CHUNK: tl.constexpr, SUB: tl.constexpr, CUTS: tl.constexpr, BLOCK_C: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    row, scale, top_k, top_p, min_p, search = _load_params(PARAMS, i)
    u = tl.load(PARAMS + i * _P + 5)
    p = tl.where(search != 0, last, 0)  # rows without a search stopped after pass 0
    cidx = tl.arange(0, BLOCK_C)
    t_bits, _, j = _decide(COUNTS, MASSES, BOUNDS, p, i, R, C, top_k, top_p, _row_total(TOTALS, i, C, BLOCK_C),
                           CUTS, BLOCK_C)
    t = t_bits.to(tl.int32).to(tl.float32, bitcast=True)
    kept = tl.load(MASSES + ((p * R + i) * C + cidx) * CUTS + j, mask=cidx < C, other=0.0).to(tl.float64)
    prefix = tl.cumsum(kept, 0)
    target = u * tl.sum(tl.where(cidx == BLOCK_C - 1, prefix, 0.0), 0)
    # the chunk where u x total falls; u x total rounded up to the total: the last chunk with a kept token
    first = tl.min(tl.where((prefix > target) & (kept > 0), cidx, BLOCK_C), 0)
    first = tl.where(first < BLOCK_C, first, tl.max(tl.where(kept > 0, cidx, -1), 0))
    run = tl.sum(tl.where(cidx == first - 1, prefix, 0.0), 0)
    m = _row_max(MAXES, i, C, BLOCK_C)
    pick = tl.full([1], V, tl.int32)
    last_kept = tl.full([1], -1, tl.int32)
    for s in range(0, CHUNK, SUB):
        offs = tl.maximum(first, 0) * CHUNK + s + tl.arange(0, SUB)
        w = _weights(X + row * stride_x, offs, V, m, scale)
        w = tl.where(w >= t, w, 0.0)
        passed = (run + tl.cumsum(w, 0).to(tl.float64) > target) & (w > 0)
        pick = tl.minimum(pick, tl.min(tl.where(passed, offs, V), 0))
        last_kept = tl.maximum(last_kept, tl.max(tl.where(w > 0, offs, -1), 0))
        run += tl.sum(w, 0).to(tl.float64)
    # the chunk's own scan rounds its sum differently: no token passed there -> its last kept token;
    # no kept token at all (a row of -inf or NaN): token 0
    pick = tl.where(pick < V, pick, tl.maximum(last_kept, 0))
    tl.store(OUT + row + tl.arange(0, 1), pick.to(tl.int64))


def sample_rows(logits: Tensor, params: Tensor, out: Tensor, search: bool = True) -> None:
    """Write the sampled token of each row described by `params` (row_params) into out[row]. logits: [B, V]
    fp32 with unit stride along V. `search`: some row asks for top-k or top-p (False skips the threshold
    passes)."""
    R, V = params.shape[0], logits.shape[1]
    if R == 0:
        return
    cfg = {"chunk": CHUNK, "sub": SUB, "cuts": CUTS, "num_warps": 4, **(CONFIG or {})}
    chunk, cuts = cfg["chunk"], cfg["cuts"]
    C = triton.cdiv(V, chunk)
    passes = -(-THRESHOLD_BITS // (cuts.bit_length() - 1)) if search else 1
    # One allocation for the scratch (4-byte words): bounds (int64) first, then per pass counts and masses;
    # per chunk the maximum, total, list length and the count and mass above pass 1's interval; the lists.
    n_stats, n_list = passes * R * C * cuts, (R * C * chunk if search else 0)
    sizes = [4 * passes * R, n_stats, n_stats, R * C, R * C, R * C, R * C, R * C, passes * R, n_list]
    words = torch.empty(sum(sizes), dtype=torch.int32, device=logits.device).split(sizes)
    bounds, counts, masses, maxes, totals, list_n, base_n, base_m, tickets, lists = words
    bounds = bounds.view(torch.int64)
    maxes, totals, masses, base_m, lists = (t.view(torch.float32) for t in (maxes, totals, masses, base_m, lists))
    shape = dict(CHUNK=chunk, SUB=min(cfg["sub"], chunk))
    consts = dict(**shape, CUTS=cuts, BLOCK_C=next_pow2(C, 2), num_warps=cfg["num_warps"])
    grid = (C, R)
    _max_kernel[grid](logits, logits.stride(0), params, maxes, tickets, V, C, passes, **shape,
                      BLOCK_P=next_pow2(passes, 2), num_warps=cfg["num_warps"])
    for p in range(passes):
        _pass_kernel[grid](logits, logits.stride(0), params, maxes, totals, counts, masses, bounds, lists, list_n,
                           base_n, base_m, tickets, V, R, C, p, passes, **consts)
    _draw_kernel[(R,)](logits, logits.stride(0), params, maxes, masses, counts, totals, bounds, out, V, R, C,
                       passes - 1, **consts)


def row_params(rows: list[int], temperature: list[float], top_k: list[int], top_p: list[float],
               min_p: list[float], uniforms: list[float], device: torch.device) -> Tensor:
    """The [R, 7] float64 parameter rows sample_rows reads, copied to the device in one transfer: logits row,
    log2(e) / temperature, top_k, top_p, min_p (0: off), the row's uniform in [0, 1), and 1 where top-k or
    top-p is on (top_k <= 0 and top_p >= 1 are off)."""
    host = torch.tensor([[r, _LOG2E / t, k if k > 0 else _NO_K, p if p < 1.0 else _NO_P, mp, u, k > 0 or p < 1.0]
                         for r, t, k, p, mp, u in zip(rows, temperature, top_k, top_p, min_p, uniforms)],
                        dtype=torch.float64)
    return host.to(device, non_blocking=True)


__all__ = ["row_params", "sample_rows"]
