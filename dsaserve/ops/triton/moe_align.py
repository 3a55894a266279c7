"""MoE routing layout in three launches: (expert, token) pairs grouped by expert into runs padded to the
GEMM's row block, and the expert of every row block.

The torch version took about 17 small kernels per MoE layer (scatter-add, cumsums, an argsort, a
searchsorted, ...), which at decode cost more than the routing itself. Here: zero two counters, count
pairs per expert (and fill every row with the pad id), then place each pair at its expert's run start
plus an atomic ticket. Within a run the order is whatever the atomics give: every row of the expert GEMMs
is computed on its own and results go back by pair id, so the order does not change any output bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.triton._common import next_pow2

Tensor = torch.Tensor
_BLOCK = 256  # pairs per program
_BLOCKS = 16  # row blocks per program (expert lookup)


@triton.jit(do_not_specialize=["P", "rows"])
def _count_kernel(IDS, COUNTS, SORTED, P, rows, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(IDS + offs, mask=offs < P, other=0)
    tl.atomic_add(COUNTS + expert, 1, mask=offs < P)
    tl.store(SORTED + offs, tl.zeros([BLOCK], tl.int32) + P, mask=offs < rows)  # pad rows point past the pairs


@triton.jit(do_not_specialize=["P", "num_blocks"])
def _place_kernel(IDS, COUNTS, TICKETS, SORTED, BLOCK_EXPERT, P, num_blocks, E,
                  E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    pid = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    counts = tl.load(COUNTS + experts, mask=experts < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    expert = tl.load(IDS + offs, mask=mask, other=0)
    ticket = tl.atomic_add(TICKETS + expert, 1, mask=mask)
    run_start = tl.gather(ends - padded, expert.to(tl.int32), 0)
    tl.store(SORTED + run_start + ticket, offs.to(tl.int32), mask=mask)
    # each row block's expert: how many runs end at or before its first row (torch.searchsorted, right)
    blocks = pid * BLOCKS + tl.arange(0, BLOCKS)
    ended = tl.sum((ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), 1)
    tl.store(BLOCK_EXPERT + blocks, tl.where(ended < E, ended, -1), mask=blocks < num_blocks)


def align(ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, int]:
    """ids: [P] expert of each pair -> (sorted_ids [max_blocks * block_m] int32: pair ids run by run, each
    run padded to block_m with P; block_expert [max_blocks] int32, -1 past the last run; max_blocks)."""
    P = ids.numel()
    max_blocks = triton.cdiv(P, block_m) + min(num_experts, P)  # each used expert pads < one block
    rows = max_blocks * block_m
    counters = torch.zeros(2 * num_experts, dtype=torch.int32, device=ids.device)
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=ids.device)
    ids = ids.contiguous()
    _count_kernel[(triton.cdiv(max(P, rows), _BLOCK),)](ids, counters, sorted_ids, P, rows, BLOCK=_BLOCK)
    grid = max(triton.cdiv(P, _BLOCK), triton.cdiv(max_blocks, _BLOCKS))
    _place_kernel[(grid,)](ids, counters, counters[num_experts:], sorted_ids, block_expert, P, max_blocks,
                           num_experts, E_POW2=next_pow2(num_experts, 2), BLOCK_M=block_m, BLOCK=_BLOCK,
                           BLOCKS=_BLOCKS)
    return sorted_ids, block_expert, max_blocks


__all__ = ["align"]
