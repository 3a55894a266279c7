"""MoE routing layout: (expert, token) pairs grouped by expert into runs padded to the GEMM's row block, and
the expert of every row block. Up to SMALL_PAIRS pairs (decode) one program does it all; above, three launches.

The torch version took about 17 small kernels per MoE layer (scatter-add, cumsums, an argsort, a
searchsorted, ...), which at decode cost more than the routing itself. Above SMALL_PAIRS: zero two
counters, count pairs per expert (and fill every row with the pad id), then place each pair at its expert's
run start plus an atomic ticket; within a run the order is whatever the atomics give (the one-program path's
is pair order). Every row of the expert GEMMs is computed on its own and results go back by pair id, so the
order does not change any output bit. Pairs of expert -1 (another rank's, under expert parallelism) are left
out: no row holds them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.triton._common import next_pow2, pdl, pdl_start

Tensor = torch.Tensor
_BLOCK = 256  # pairs per program
_BLOCKS = 16  # row blocks per program (expert lookup)
SMALL_PAIRS = 256  # up to this many pairs (32 tokens at top-8) one launch builds the layout, not three


@triton.jit(do_not_specialize=["P", "rows"])
def _count_kernel(IDS, COUNTS, SORTED, P, rows, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(IDS + offs, mask=offs < P, other=-1)
    tl.atomic_add(COUNTS + expert, 1, mask=expert >= 0)
    tl.store(SORTED + offs, tl.zeros([BLOCK], tl.int32) + P, mask=offs < rows)  # pad rows point past the pairs


@triton.jit(do_not_specialize=["P", "num_blocks"])
def _place_kernel(IDS, COUNTS, TICKETS, SORTED, BLOCK_EXPERT, P, num_blocks, E, BLOCK_M,
                  E_POW2: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    pid = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    counts = tl.load(COUNTS + experts, mask=experts < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(IDS + offs, mask=offs < P, other=-1)
    mask = expert >= 0
    expert = tl.maximum(expert, 0)
    ticket = tl.atomic_add(TICKETS + expert, 1, mask=mask)
    run_start = tl.gather(ends - padded, expert.to(tl.int32), 0)
    tl.store(SORTED + run_start + ticket, offs.to(tl.int32), mask=mask)
    # each row block's expert: how many runs end at or before its first row (torch.searchsorted, right)
    blocks = pid * BLOCKS + tl.arange(0, BLOCKS)
    ended = tl.sum((ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), 1)
    tl.store(BLOCK_EXPERT + blocks, tl.where(ended < E, ended, -1), mask=blocks < num_blocks)


@triton.jit(do_not_specialize=["P", "num_blocks"])
def _align_small_kernel(IDS, SORTED, BLOCK_EXPERT, P, num_blocks, BLOCK_M, PB: tl.constexpr, E_POW2: tl.constexpr,
                        FILL: tl.constexpr, PDL: tl.constexpr):
    """The whole layout in one program for up to PB pairs (decode): counts by a histogram, each pair's place
    by a sort of (expert, pair) keys, so the runs come out in pair order (stable) and nothing needs zeroed
    counters. BLOCK_M (16, 64 or 128: one specialization) is not a constexpr in either path: which of them a
    row tier takes depends on P, and the warm-up compiles each path once, not once per tier."""
    pdl_start(PDL)
    offs = tl.arange(0, PB)
    expert = tl.load(IDS + offs, mask=offs < P, other=-1).to(tl.int32)
    valid = expert >= 0
    expert = tl.maximum(expert, 0)
    counts = tl.histogram(expert, E_POW2, mask=valid)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    starts = tl.cumsum(padded, 0) - padded  # each run's first row
    firsts = tl.cumsum(counts, 0) - counts  # each run's first position among the sorted pairs
    rows = num_blocks * BLOCK_M
    for r0 in range(0, rows, FILL):  # pad rows point past the pairs; blocks past the last run are -1
        r = r0 + tl.arange(0, FILL)
        tl.store(SORTED + r, tl.zeros([FILL], tl.int32) + P, mask=r < rows)
        tl.store(BLOCK_EXPERT + r, tl.zeros([FILL], tl.int32) - 1, mask=r < num_blocks)
    tl.debug_barrier()  # the stores below overwrite the fill's
    keys = tl.sort(tl.where(valid, expert * PB + offs, E_POW2 * PB + offs))  # invalid lanes sort last
    run = tl.minimum(keys // PB, E_POW2 - 1)
    row = tl.gather(starts, run, 0) + offs - tl.gather(firsts, run, 0)
    tl.store(SORTED + row, keys % PB, mask=offs < tl.sum(valid.to(tl.int32), 0))  # the sorted valid keys
    experts = tl.arange(0, E_POW2)
    for t in range(0, tl.cdiv(P, BLOCK_M)):  # a run has at most cdiv(P, BLOCK_M) blocks
        tl.store(BLOCK_EXPERT + starts // BLOCK_M + t, experts, mask=t * BLOCK_M < padded)


def align(ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, int]:
    """ids: [P] expert of each pair (-1: none of these) -> (sorted_ids [max_blocks * block_m] int32: pair ids run
    by run, each run padded to block_m with P; block_expert [max_blocks] int32, -1 past the last run; max_blocks)."""
    P = ids.numel()
    max_blocks = triton.cdiv(P, block_m) + min(num_experts, P)  # each used expert pads < one block
    rows = max_blocks * block_m
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=ids.device)
    ids = ids.contiguous()
    if 0 < P <= SMALL_PAIRS:
        # PB fixed (not P's power of two): no batch size after the warm-up compiles a new variant
        _align_small_kernel[(1,)](ids, sorted_ids, block_expert, P, max_blocks, block_m, PB=SMALL_PAIRS,
                                  E_POW2=next_pow2(num_experts, 2), FILL=1024, num_warps=4, **pdl(ids))
        return sorted_ids, block_expert, max_blocks
    counters = torch.zeros(2 * num_experts, dtype=torch.int32, device=ids.device)
    _count_kernel[(triton.cdiv(max(P, rows), _BLOCK),)](ids, counters, sorted_ids, P, rows, BLOCK=_BLOCK, **pdl(ids))
    grid = max(triton.cdiv(P, _BLOCK), triton.cdiv(max_blocks, _BLOCKS))
    _place_kernel[(grid,)](ids, counters, counters[num_experts:], sorted_ids, block_expert, P, max_blocks,
                           num_experts, block_m, E_POW2=next_pow2(num_experts, 2), BLOCK=_BLOCK,
                           BLOCKS=_BLOCKS, **pdl(ids))
    return sorted_ids, block_expert, max_blocks


__all__ = ["SMALL_PAIRS", "align"]
