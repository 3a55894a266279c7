"""Prefill-sized FP8 experts on Hopper (moe.moe_experts picks this from moe.WGMMA_MIN_ROWS rows per expert):
fp8_wgmma's pipelined Gluon GEMM in grouped mode, block_m rows per block (64 or 128) and `stages` stages."""
from __future__ import annotations

import torch

from dsaserve.ops.fp8 import FP8, BlockFP8
from dsaserve.ops.triton import fp8_wgmma
from dsaserve.ops.triton._common import new_empty
from dsaserve.ops.triton.fp8_gemm import act_quant
from dsaserve.ops.triton.moe_align import align
from dsaserve.ops.triton.moe_glue import reduce_pairs, silu_mul_quant

Tensor = torch.Tensor


def moe_fp8_wgmma(x: Tensor, w13: BlockFP8, w2: BlockFP8, topk_ids: Tensor, topk_weights: Tensor,
                  num_tokens: int, out: Tensor, bm: int, stages: int) -> Tensor:
    """The same three steps in sorted row order: x's quantized rows gathered per pair, gate/up to fp32,
    silu(gate) * up quantized, down times the routing weight, then each token's rows summed by position.
    The temporaries are dropped as soon as they are read, so the next ones reuse their memory."""
    hidden = x.shape[1]
    E, I2, _ = w13.shape
    k = topk_ids.shape[1]
    P = num_tokens * k
    sorted_ids, block_expert, max_blocks = align(topk_ids[:num_tokens].reshape(-1), E, bm)
    R = max_blocks * bm
    valid = sorted_ids < P
    pair = torch.where(valid, sorted_ids, 0).long()
    token = pair // k
    a, a_s = act_quant(x[:num_tokens], 128)
    a_rows = a.view(torch.uint8)[token].view(FP8)  # gathered per pair: TMA reads rows in place
    a_s_gm = a_s[token].t().contiguous()
    # fp32, as the reference quantizes silu(gate) * up from fp32 (bf16 here moved 1.3-1.5% of the output)
    gate_up = new_empty((R, I2), torch.float32, x.device)
    fp8_wgmma.block_scaled_mm(a_rows, a_s_gm, w13, gate_up, block_m=bm, block_expert=block_expert, stages=stages)
    del a, a_s, a_rows, a_s_gm
    inter = new_empty((R, I2 // 2), FP8, x.device)
    inter_s = new_empty((I2 // 2 // 128, R), torch.float32, x.device)
    silu_mul_quant(gate_up.unsqueeze(0), inter, inter_s, inter_s.stride(0), 1, block_expert, bm)
    del gate_up
    row_weight = torch.where(valid, topk_weights.reshape(-1)[pair], 0.0)
    y = new_empty((R, hidden), x.dtype, x.device)
    fp8_wgmma.block_scaled_mm(inter, inter_s, w2, y, block_m=bm, block_expert=block_expert, row_weight=row_weight,
                              stages=stages)
    # slot P takes the padding rows' writes and is never read: every other slot is written once
    pos = torch.empty(P + 1, dtype=torch.int32, device=x.device)  # (pairs of expert -1: no row, never read)
    pos.scatter_(0, sorted_ids.long(), torch.arange(R, dtype=torch.int32, device=x.device))
    reduce_pairs(y, pos, topk_ids.contiguous(), out, num_tokens, k)
    return out


__all__ = ["moe_fp8_wgmma"]
