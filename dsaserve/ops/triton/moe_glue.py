"""The MoE's glue between its GEMMs: silu(gate) * up quantized for the down GEMM (summing split-K partials),
and each token's routed rows summed. Shared by the Triton path (moe.py) and the Gluon one."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.triton._common import next_pow2, pdl, pdl_start, quantize_rows

Tensor = torch.Tensor
MAX_SPLITS = 16  # split-K partial sums silu_mul_quant adds (moe's gate/up never makes more)


@triton.jit(do_not_specialize=["R", "stride_sg", "stride_sr", "splits", "stride_split"])
def _silu_mul_quant_kernel(GU, Q, S, BLOCK_EXPERT, R, I, stride_gu, stride_q, stride_sg, stride_sr, splits,
                           stride_split, BLOCK_M: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                           SPLITS: tl.constexpr, PDL: tl.constexpr):
    """GU [splits, R, 2I] (gate | up partial sums; SPLITS >= splits, a power of two: all loaded at once, not in
    a chain of dependent loads) -> e4m3 silu(gate) * up [R, I] with per-128 scales S[group * stride_sg + row *
    stride_sr]; rows of the blocks past the last expert's (BLOCK_EXPERT -1: never computed, never read) are
    skipped."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    if tl.load(BLOCK_EXPERT + row // BLOCK_M) < 0:
        return
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    split = tl.arange(0, SPLITS).to(tl.int64)[:, None, None]
    src = GU + split * stride_split + row * stride_gu + cols[None, :, :]
    mask = (split < splits) & (cols < I)[None, :, :]
    gate = tl.sum(tl.load(src, mask=mask, other=0.0).to(tl.float32), 0)
    up = tl.sum(tl.load(src + I, mask=mask, other=0.0).to(tl.float32), 0)
    q, scale = quantize_rows(gate / (1.0 + tl.exp(-gate)) * up)
    tl.store(Q + row * stride_q + cols, q, mask=cols < I)
    tl.store(S + g * stride_sg + row * stride_sr, scale, mask=g * GROUP < I)


@triton.jit(do_not_specialize=["num_tokens"])
def _reduce_kernel(YBUF, POS, IDS, OUT, stride_y, stride_o, num_tokens, HIDDEN, TOPK: tl.constexpr,
                   BLOCK: tl.constexpr, INDEXED: tl.constexpr, PDL: tl.constexpr):
    """INDEXED: pair p's row of YBUF is POS[p] (YBUF in sorted order), else p. Pairs whose IDS entry is -1 (another
    rank's expert) have no row and add nothing. The pairs are unrolled, so their loads do not wait on each other's
    (a loop over them chained TOPK x 3 dependent loads); the rows still add in pair order."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    c_mask = cols < HIDDEN
    live = row < num_tokens
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOPK):
        has_row = live & (tl.load(IDS + row * TOPK + j, mask=live, other=-1) >= 0)
        y_row = tl.load(POS + row * TOPK + j, mask=has_row, other=0).to(tl.int64) if INDEXED else row * TOPK + j
        # -0.0 where there is no row: adding it leaves every sum as it was, -0.0 included
        acc += tl.load(YBUF + y_row * stride_y + cols, mask=c_mask & has_row, other=-0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, acc.to(OUT.dtype.element_ty), mask=c_mask)


def silu_mul_quant(gate_up: Tensor, inter: Tensor, inter_s: Tensor, stride_sg: int, stride_sr: int,
                    block_expert: Tensor, block_m: int) -> None:
    """gate_up [splits, R, 2I] fp32 partial sums -> inter (e4m3 [R, I]) and its per-128 scales at
    inter_s[group * stride_sg + row * stride_sr]."""
    splits, R, I2 = gate_up.shape
    if splits > MAX_SPLITS:
        raise ValueError(f"silu_mul_quant: {splits} partial sums, at most {MAX_SPLITS}")
    split_block = 1 if splits == 1 else MAX_SPLITS  # two variants whatever the batch: none after the warm-up
    groups = max(1, min(16 // split_block, 8, next_pow2(I2 // 2 // 128, 1)))  # <= 16 x 128 loads of gate and of up
    _silu_mul_quant_kernel[(R, triton.cdiv(I2 // 2 // 128, groups))](
        gate_up, inter, inter_s, block_expert, R, I2 // 2, gate_up.stride(1), inter.stride(0), stride_sg, stride_sr,
        splits, gate_up.stride(0), BLOCK_M=block_m, GROUP=128, GROUPS=groups, SPLITS=split_block,
        num_warps=4, **pdl(gate_up))


def reduce_pairs(ybuf: Tensor, pos: Tensor | None, ids: Tensor, out: Tensor, num_tokens: int, topk: int) -> None:
    """out[t] = the sum of token t's pair rows of ybuf (ids: the pairs' experts [>= num_tokens, topk], contiguous)."""
    hidden = out.shape[1]
    block = min(1024, next_pow2(hidden))
    _reduce_kernel[(out.shape[0], triton.cdiv(hidden, block))](
        ybuf, ybuf if pos is None else pos, ids, out, ybuf.stride(0), out.stride(0), num_tokens, hidden, TOPK=topk,
        BLOCK=block, INDEXED=pos is not None, num_warps=4, **pdl(ybuf))


__all__ = ["MAX_SPLITS", "reduce_pairs", "silu_mul_quant"]
