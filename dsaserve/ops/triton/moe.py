"""Routed experts as a grouped GEMM.

Token-expert pairs are sorted by expert and each expert's run is padded to a multiple of BLOCK_M, so every
M block belongs to one expert (block_expert). moe_align.align builds this in one launch (decode) or three,
with an upper bound on the block count, so there is no host sync (the op can be captured in a CUDA graph). Then:
  1. gate/up: one program computes a BLOCK_M x BLOCK_N tile of both gate and up (same A rows, two weight
     tiles), applies silu(gate) * up in fp32 and writes the bf16 intermediate in sorted order;
  2. down: intermediate @ w2[e]^T, scaled by the routing weight, written to a per-pair buffer indexed by
     the original pair id (token * topk + j), so no atomics are needed;
  3. reduce: out[token] = sum_j buffer[token * topk + j] in fp32; rows >= num_tokens are written as 0.
Program ids are grouped (GROUP_M M blocks share each N sweep) so weight tiles and A rows stay in L2.
Up to DIRECT_MAX_PAIRS pairs (decode) there is no layout: M block m is pair m, its row 0 the only one used.

Block-FP8 experts (dsaserve.ops.fp8.BlockFP8) run the same three steps on e4m3 operands: x is quantized
once per token and 128-channel group; gate/up accumulate each K group's product times (activation scale x
block scale) in fp32, and quantize silu(gate) * up per row in the epilogue (a BLOCK_N of one group), so
the down GEMM reads e4m3 intermediates with their scales. At decode rows on narrow expert slices (TP-4/8:
2-4 strips of 128 columns per expert) gate/up splits K (gate_up_splits) and writes fp32 partials that
moe_glue.silu_mul_quant sums before the same quantization: 1.5-1.9x at 1 token on an H200.

Prefill-sized FP8 experts on Hopper (WGMMA_MIN_ROWS rows per expert on average, fp8_wgmma.MIN_FLOP) take
fp8_wgmma's pipelined Gluon GEMM in grouped mode instead (moe_wgmma.py): x's quantized rows gathered into
sorted order, gate/up written in fp32, silu(gate) * up quantized by a small kernel, down times the routing
weight in sorted order, and the reduce reads each pair's row through its position (1.08-1.15x at 2048-4096
tokens).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.fp8 import FP8, BlockFP8, QuantizedRows
from dsaserve.ops.triton import fp8_wgmma
from dsaserve.ops.triton._common import dot_precision, new_empty, pdl, pdl_start, quantize_rows, sm_count, tile_ids
from dsaserve.ops.triton.fp8_gemm import K_BLOCKS, act_quant, balanced_splits
from dsaserve.ops.triton.moe_align import align
from dsaserve.ops.triton.moe_glue import MAX_SPLITS, reduce_pairs, silu_mul_quant
from dsaserve.ops.triton.moe_wgmma import moe_fp8_wgmma

Tensor = torch.Tensor

# Tuning override for benchmarks: dict with any of block_m, block_n, block_k, num_warps, num_stages,
# down_block_n, down_block_k, down_num_warps, down_num_stages, group_m, a_quant and gate_up_splits (FP8: x quantized
# inside gate/up, its split-K count; the Triton kernels),
# direct (0: never the layout-free decode path; 1: whenever the decode tiles apply),
# and wgmma (0: never the Gluon path, 1: wherever it applies, whatever the size), wgmma_block_m (64 or 128),
# wgmma_stages.
CONFIG: dict[str, int] | None = None
# Up to this many pairs FP8 gate/up quantizes x in every program (one launch fewer: 1-4% faster at 1-4 tokens);
# from 16 tokens on TP-4/8 expert slices that made the kernel 4-8% slower than quantizing once (H200).
A_QUANT_MAX_PAIRS = 32
# Up to this many pairs (decode rows) the GEMMs take the pairs in their own order (BY_PAIR): no routing layout,
# one launch fewer (1-6% faster at 1-4 tokens on an H200; token-major down GEMMs without the reduce were slower).
DIRECT_MAX_PAIRS = 32
# At FP8 decode rows a down GEMM of at most this many K steps (a TP-8 slice of V3.2: inter 256, two) takes 2 pipeline
# stages, not 4: the same bits, 2-4% less time for the whole MoE call at 1-64 tokens on an H200 (the other stages
# only hold shared memory that no K step fills).
SHORT_DOWN_STEPS = 2
WGMMA_MIN_ROWS = 64  # rows per expert on average from which FP8 experts run the pipelined wgmma GEMM (Hopper)
# (token, expert) pairs from which the bf16 down projection takes 256-column tiles (3 stages): 4-16% faster
# at 4096-16384 tokens on 17 experts of 2048 and 257 of 256 or 2048, 8% slower at 1024 tokens on 17 experts
# (H200 sweep, docs/benchmarks.md).
WIDE_DOWN_MIN_PAIRS = 16384


@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks", "groups_per_split", "stride_split"])
def _gate_up_kernel(X, XS, W13, W13S, INTER, INTERS, SORTED, BLOCK_EXPERT,
                    stride_x, stride_xs, stride_we, stride_wn, stride_se, stride_sn, stride_i, stride_is,
                    num_pairs, topk, I, HIDDEN, num_m_blocks, groups_per_split, stride_split,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr, SCALE_N: tl.constexpr,
                    SPLIT_K: tl.constexpr, A_QUANT: tl.constexpr, BY_PAIR: tl.constexpr, PDL: tl.constexpr):
    """FP8: X, W13 e4m3 with scales XS (token, K group) and W13S (expert, row block, K group); the
    epilogue quantizes each row's BLOCK_N values (one group of the down GEMM) into INTER + INTERS.
    SPLIT_K (FP8, whole K blocks): program_id(1)'s groups_per_split K groups only, gate | up written in fp32
    to INTER + split * stride_split (rows of 2I) for moe_glue.silu_mul_quant to sum. A_QUANT (FP8, decode rows):
    X holds the unquantized rows and each K step quantizes its [BLOCK_M, 128] slice (bit-identical to
    act_quant), which saves a launch where few programs share a row. BY_PAIR (decode rows): M block m is pair m
    in its original order (BLOCK_EXPERT the flat top-k ids, SORTED unused), its row 0 the only one computed."""
    pdl_start(PDL)
    m_blk, n_blk = tile_ids(num_m_blocks, I, BLOCK_N, GROUP_M)
    expert = tl.load(BLOCK_EXPERT + m_blk)
    if expert < 0:  # past the last padded block: nothing to do
        return
    if BY_PAIR:
        rows = m_blk + tl.zeros([BLOCK_M], tl.int32)
        pair = rows
        p_mask = tl.arange(0, BLOCK_M) == 0
        keep = p_mask  # rows stored
    else:
        rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(SORTED + rows)
        p_mask = pair < num_pairs  # padding entries hold num_pairs
        keep = rows >= 0  # every row, padding too (silu_mul_quant reads whole blocks)
    token = tl.where(p_mask, pair // topk, 0).to(tl.int64)
    cols = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < I
    g0 = tl.program_id(1) * groups_per_split if SPLIT_K else 0  # first K group
    k_start = g0 * BLOCK_K
    k_end = tl.minimum(HIDDEN, k_start + groups_per_split * BLOCK_K) if SPLIT_K else HIDDEN
    kk = tl.arange(0, BLOCK_K)
    a_ptr = X + token[:, None] * stride_x + (k_start + kk)[None, :]
    g_ptr = W13 + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + (k_start + kk)[:, None]
    u_ptr = g_ptr + I * stride_wn
    as_ptr = XS + token * stride_xs + g0  # the scale pointers are unused (never loaded) without FP8
    gs_ptr = W13S + expert.to(tl.int64) * stride_se + (cols // SCALE_N) * stride_sn + g0
    us_ptr = W13S + expert.to(tl.int64) * stride_se + ((cols + I) // SCALE_N) * stride_sn + g0
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptr, mask=p_mask[:, None], other=0.0)
            g = tl.load(g_ptr, mask=n_mask[None, :], other=0.0)
            u = tl.load(u_ptr, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = k0 + kk < HIDDEN
            a = tl.load(a_ptr, mask=p_mask[:, None] & k_mask[None, :], other=0.0)
            g = tl.load(g_ptr, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            u = tl.load(u_ptr, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        if FP8:
            if A_QUANT:
                a, a_s = quantize_rows(a.to(tl.float32))
                a_s = a_s[:, None]
            else:
                a_s = tl.load(as_ptr, mask=p_mask, other=0.0)[:, None]
            acc_g += tl.dot(a, g) * (a_s * tl.load(gs_ptr, mask=n_mask, other=0.0)[None, :])
            acc_u += tl.dot(a, u) * (a_s * tl.load(us_ptr, mask=n_mask, other=0.0)[None, :])
        else:
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptr += BLOCK_K
        g_ptr += BLOCK_K
        u_ptr += BLOCK_K
        as_ptr += 1
        gs_ptr += 1
        us_ptr += 1
    if SPLIT_K:  # partial sums: gate | up of this K range
        part = INTER + tl.program_id(1).to(tl.int64) * stride_split + rows.to(tl.int64)[:, None] * stride_i
        tl.store(part + cols[None, :], acc_g, mask=n_mask[None, :] & keep[:, None])
        tl.store(part + I + cols[None, :], acc_u, mask=n_mask[None, :] & keep[:, None])
        return
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # columns >= I are 0
    out = INTER + rows.to(tl.int64)[:, None] * stride_i + cols[None, :]
    if FP8:
        q, scale = quantize_rows(h)
        tl.store(out, q, mask=n_mask[None, :] & keep[:, None])
        tl.store(INTERS + rows.to(tl.int64) * stride_is + n_blk, scale, mask=keep)
    else:
        tl.store(out, h.to(INTER.dtype.element_ty), mask=n_mask[None, :] & keep[:, None])


@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks"])
def _down_kernel(INTER, INTERS, W2, W2S, YBUF, SORTED, BLOCK_EXPERT, TOPW,
                 stride_i, stride_is, stride_we, stride_wn, stride_se, stride_sn, stride_y, stride_tw,
                 num_pairs, topk, I, HIDDEN, num_m_blocks,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 EVEN_K: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr, SCALE_N: tl.constexpr,
                 BY_PAIR: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    m_blk, n_blk = tile_ids(num_m_blocks, HIDDEN, BLOCK_N, GROUP_M)
    expert = tl.load(BLOCK_EXPERT + m_blk)
    if expert < 0:
        return
    if BY_PAIR:  # as in _gate_up_kernel
        rows = m_blk + tl.zeros([BLOCK_M], tl.int32)
        pair = rows
        p_mask = tl.arange(0, BLOCK_M) == 0
    else:
        rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(SORTED + rows)
        p_mask = pair < num_pairs
    cols = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < HIDDEN
    kk = tl.arange(0, BLOCK_K)
    a_ptr = INTER + rows.to(tl.int64)[:, None] * stride_i + kk[None, :]
    b_ptr = W2 + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + kk[:, None]
    as_ptr = INTERS + rows.to(tl.int64) * stride_is
    bs_ptr = W2S + expert.to(tl.int64) * stride_se + (cols // SCALE_N) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptr)
            b = tl.load(b_ptr, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = k0 + kk < I
            a = tl.load(a_ptr, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptr, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        if FP8:
            acc += tl.dot(a, b) * (tl.load(as_ptr)[:, None] * tl.load(bs_ptr, mask=n_mask, other=0.0)[None, :])
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
        as_ptr += 1
        bs_ptr += 1
    safe_pair = tl.where(p_mask, pair, 0)
    weight = tl.load(TOPW + (safe_pair // topk).to(tl.int64) * stride_tw + safe_pair % topk, mask=p_mask, other=0.0)
    y = acc * weight[:, None]
    out = YBUF + safe_pair.to(tl.int64)[:, None] * stride_y + cols[None, :]
    tl.store(out, y.to(YBUF.dtype.element_ty), mask=p_mask[:, None] & n_mask[None, :])


def gate_up_splits(pairs: int, experts: int, inter: int, hidden: int, block: int, sms: int, block_m: int) -> int:
    """Split-K count of the FP8 gate/up GEMM at decode rows. Its programs are the row blocks (about one per hit
    expert) x block-wide column strips: 16 at batch 1 on a TP-8 slice of DeepSeek-V3.2 (inter 256), too few to
    stream the weights (14% of copy bandwidth on an H200), so its K groups split as the dense decode GEMM's do
    (fp8_gemm.balanced_splits) until the programs fill the SMs. Between 1.5 and 4 tiles per SM they fill them
    but end in a ragged last wave (18 pairs of whole experts: 288 tiles, 2.2 per SM, 17% slower than 4-7
    splits on an H200): there the split evens the waves out, with finer programs allowed."""
    tiles = max(min(pairs, experts), triton.cdiv(pairs, block_m)) * triton.cdiv(inter, block)
    if 2 * tiles < 3 * sms:
        return balanced_splits(tiles, triton.cdiv(hidden, block), sms, max_programs=4 * sms)
    return balanced_splits(tiles, triton.cdiv(hidden, block), sms, max_programs=16 * sms) if tiles < 4 * sms else 1


def _config(num_pairs: int, num_experts: int, fp8_block: tuple[int, int] | None, inter: int, hidden: int,
            sms: int) -> dict[str, int]:
    """Tiles by rows per expert (CONFIG overrides any of them, except FP8's fixed K steps and gate/up width)."""
    per_expert = num_pairs / max(1, min(num_experts, num_pairs))
    if fp8_block is not None:
        # gate/up keeps two accumulators plus each step's two dot results: BLOCK_M 64 over 8 warps fits
        # the registers; BLOCK_N and the K steps are one quantization group / weight K block.
        base = (dict(block_m=64, num_warps=8, num_stages=3, down_block_n=128, down_num_warps=8, down_num_stages=4,
                     group_m=8, a_quant=0, gate_up_splits=1) if per_expert >= 24 else
                dict(block_m=16, num_warps=4, num_stages=3, down_block_n=64, down_num_warps=4,
                     down_num_stages=2 if inter <= SHORT_DOWN_STEPS * fp8_block[1] else 4,
                     group_m=1, a_quant=int(num_pairs <= A_QUANT_MAX_PAIRS),
                     gate_up_splits=gate_up_splits(num_pairs, num_experts, inter, hidden, fp8_block[1], sms, 16)))
        return {**base, **(CONFIG or {}), "block_n": fp8_block[1], "block_k": fp8_block[1],
                "down_block_k": fp8_block[1]}
    if per_expert >= 96:  # prefill: compute-bound tiles
        wide = num_pairs >= WIDE_DOWN_MIN_PAIRS
        base = dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, down_block_n=256 if wide else 128,
                    down_block_k=64, down_num_warps=8, down_num_stages=3 if wide else 4, group_m=8)
    elif per_expert >= 24:
        base = dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4,
                    down_block_n=128, down_block_k=64, down_num_warps=4, down_num_stages=4, group_m=8)
    else:  # decode: weight streaming; small M, long K steps, many N tiles in flight
        base = dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3,
                    down_block_n=64, down_block_k=128, down_num_warps=4, down_num_stages=4, group_m=1)
    base.update(CONFIG or {})
    return base


def moe_experts(x: Tensor, w13: Tensor | BlockFP8, w2: Tensor | BlockFP8, topk_ids: Tensor, topk_weights: Tensor,
                num_tokens: int, xq: QuantizedRows | None = None, local_share: float = 1.0) -> Tensor:
    """See reference.moe_experts: weights in x's dtype, or block FP8 (e4m3 + fp32 block scales). xq: x's rows
    already quantized (act_quant's values): FP8 gate/up reads them (the wgmma path quantizes x itself).
    local_share: under expert parallelism the share of the pairs expected on these experts (the others are -1):
    tiles, split-K and the wgmma choice follow that many pairs, not all of them."""
    N, hidden = x.shape
    E, I2, _ = w13.shape
    I = I2 // 2
    k = topk_ids.shape[1]
    out = new_empty((N, hidden), x.dtype, x.device)
    if N == 0:
        return out
    P = num_tokens * k
    if P == 0:
        out.zero_()
        return out
    expected = max(1, round(P * local_share))  # the pairs these experts are expected to take
    x = x.contiguous()
    topk_weights = topk_weights.float().contiguous()
    fp8 = isinstance(w13, BlockFP8)
    if fp8 != isinstance(w2, BlockFP8):
        raise ValueError("moe: w13 and w2 must both be block FP8 or both plain tensors")
    if fp8:
        _check_fp8(w13, w2, hidden)
        if _wgmma_applies(x, w13, w2, expected, E):
            return moe_fp8_wgmma(x, w13, w2, topk_ids, topk_weights, num_tokens, out,
                                 _override("wgmma_block_m", 64), _override("wgmma_stages", 3))
    cfg = _config(expected, E, w13.block if fp8 else None, I, hidden, sm_count(x))
    bm = cfg["block_m"]
    # decode rows: both GEMMs take one M block per pair in pair order (block m's expert is the flat top-k ids'
    # entry m), so no routing layout is built; the same products and reduce, bit for bit
    by_pair = bool(_override("direct", int(P <= DIRECT_MAX_PAIRS))) and bm == 16
    if by_pair:
        sorted_ids = block_expert = topk_ids[:num_tokens].reshape(-1).contiguous()
        max_blocks, rows = P, P
    else:
        sorted_ids, block_expert, max_blocks = align(topk_ids[:num_tokens].reshape(-1), E, bm)
        rows = max_blocks * bm
    if fp8:
        # once per token, gathered per pair; for a few pairs gate/up quantizes its slices of x itself
        if xq is not None:
            a, a_s = xq.values, xq.scales
        else:
            a, a_s = (x, x) if cfg["a_quant"] else act_quant(x[:num_tokens], w13.block[1])
        w13_w, w13_s, w2_w, w2_s, scale_n = w13.weight, w13.scale, w2.weight, w2.scale, w13.block[0]
        inter = new_empty((rows, I), FP8, x.device)
        inter_s = new_empty((rows, I // cfg["block_n"]), torch.float32, x.device)
    else:  # scale arguments are placeholders the kernels never read
        a = a_s = x
        w13_w = w13_s = w13.contiguous()
        w2_w = w2_s = w2.contiguous()
        scale_n = 1
        inter = inter_s = new_empty((rows, I), x.dtype, x.device)
    _gate_up(a, a_s, w13_w, w13_s, inter, inter_s, sorted_ids, block_expert, max_blocks, P, k, cfg, fp8, scale_n,
             by_pair)
    ybuf = new_empty((P, hidden), x.dtype, x.device)
    _down(inter, inter_s, w2_w, w2_s, ybuf, sorted_ids, block_expert, topk_weights, max_blocks, P, k, cfg, fp8, scale_n,
          dot_precision(x.dtype), by_pair)
    reduce_pairs(ybuf, None, topk_ids.contiguous(), out, num_tokens, k)
    return out


def _down(inter: Tensor, inter_s: Tensor, w2: Tensor, w2_s: Tensor, ybuf: Tensor, sorted_ids: Tensor,
          block_expert: Tensor, topk_weights: Tensor, max_blocks: int, P: int, k: int, cfg: dict[str, int], fp8: bool,
          scale_n: int, precision: str, by_pair: bool) -> None:
    """ybuf[pair] = routing weight x (inter @ w2[expert]^T) of each sorted pair (by_pair: block m pair m)."""
    hidden, I = w2.shape[1], w2.shape[2]
    _down_kernel[(max_blocks * triton.cdiv(hidden, cfg["down_block_n"]),)](
        inter, inter_s, w2, w2_s, ybuf, sorted_ids, block_expert, topk_weights,
        inter.stride(0), inter_s.stride(0), w2.stride(0), w2.stride(1), w2_s.stride(0), w2_s.stride(1),
        ybuf.stride(0), topk_weights.stride(0), P, k, I, hidden, max_blocks,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["down_block_n"], BLOCK_K=cfg["down_block_k"],
        GROUP_M=cfg["group_m"], EVEN_K=I % cfg["down_block_k"] == 0, PRECISION=precision, FP8=fp8,
        SCALE_N=scale_n, BY_PAIR=by_pair, num_warps=cfg["down_num_warps"], num_stages=cfg["down_num_stages"],
        **pdl(inter))


def _gate_up(a: Tensor, a_s: Tensor, w13: Tensor, w13_s: Tensor, inter: Tensor, inter_s: Tensor, sorted_ids: Tensor,
             block_expert: Tensor, max_blocks: int, P: int, k: int, cfg: dict[str, int], fp8: bool,
             scale_n: int, by_pair: bool) -> None:
    """inter (and FP8 scales) = silu(gate) * up of each sorted pair: one launch, or at FP8 decode rows
    cfg["gate_up_splits"] launches' worth of K ranges whose fp32 partials moe_glue.silu_mul_quant sums.
    by_pair: max_blocks = P blocks, block m pair m (block_expert the flat top-k ids), inter in pair order."""
    I, hidden, bm = w13.shape[1] // 2, a.shape[1], cfg["block_m"]
    groups = triton.cdiv(hidden, cfg["block_k"])
    splits = cfg["gate_up_splits"] if fp8 and hidden % cfg["block_k"] == 0 else 1
    per_split = max(triton.cdiv(groups, splits), triton.cdiv(groups, MAX_SPLITS))
    splits = triton.cdiv(groups, per_split)
    out = new_empty((splits, inter.shape[0], 2 * I), torch.float32, a.device) if splits > 1 else inter
    _gate_up_kernel[(max_blocks * triton.cdiv(I, cfg["block_n"]), splits)](
        a, a_s, w13, w13_s, out, inter_s, sorted_ids, block_expert,
        a.stride(0), a_s.stride(0), w13.stride(0), w13.stride(1), w13_s.stride(0), w13_s.stride(1),
        out.stride(-2), inter_s.stride(0), P, k, I, hidden, max_blocks, per_split, out.stride(0),
        BLOCK_M=bm, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], GROUP_M=cfg["group_m"],
        EVEN_K=hidden % cfg["block_k"] == 0, PRECISION=dot_precision(a.dtype),
        FP8=fp8, SCALE_N=scale_n, SPLIT_K=splits > 1, A_QUANT=fp8 and a.dtype != FP8, BY_PAIR=by_pair,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl(a))
    if splits > 1:
        silu_mul_quant(out, inter, inter_s, 1, inter_s.stride(0), block_expert, 1 if by_pair else bm)


def _override(key: str, default: int | None) -> int | None:
    return (CONFIG or {}).get(key, default)


def _wgmma_applies(x: Tensor, w13: BlockFP8, w2: BlockFP8, pairs: int, experts: int) -> bool:
    """Prefill-sized FP8 MoE on Hopper: the pipelined wgmma GEMM (fp8_wgmma) from WGMMA_MIN_ROWS rows per
    expert on average and fp8_wgmma.MIN_FLOP (CONFIG's "wgmma" 0 forces the Triton kernels)."""
    _, I2, hidden = w13.shape
    forced = _override("wgmma", None)
    large = pairs >= WGMMA_MIN_ROWS * min(experts, pairs) and 3.0 * pairs * hidden * I2 >= fp8_wgmma.MIN_FLOP
    if not (forced if forced is not None else large):  # (3 x pairs x hidden x 2I = flops())
        return False
    return fp8_wgmma.applies(x, w13) and fp8_wgmma.applies(x, w2)


def _check_fp8(w13: BlockFP8, w2: BlockFP8, hidden: int) -> None:
    """Shapes the FP8 kernels rely on (Python ints only: no device work)."""
    E, I2, H = w13.shape
    I = I2 // 2
    w13.check("moe w13")
    w2.check("moe w2")
    bn, bk = w13.block
    if w2.block != w13.block or tuple(w2.shape) != (E, hidden, I) or H != hidden:
        raise ValueError(f"moe: w13 {list(w13.shape)} / w2 {list(w2.shape)} (blocks {w13.block}, {w2.block}) do "
                         f"not fit hidden {hidden}")
    if bk not in K_BLOCKS or I % bn or I % bk:
        raise ValueError(f"moe: FP8 experts need K blocks in {K_BLOCKS} and an intermediate size ({I}) of whole "
                         f"blocks {w13.block} (the model pads it)")


def flops(num_tokens: int, topk: int, hidden: int, inter: int) -> float:
    return 2.0 * num_tokens * topk * 3 * hidden * inter


def weight_bytes(topk_ids: Tensor, num_tokens: int, hidden: int, inter: int, elem: float = 2) -> float:
    """Bytes of the expert weights that must be read: every expert hit at least once, read once
    (FP8: elem 1 plus 4 / 128^2 for the block scales)."""
    used = int(torch.unique(topk_ids[:num_tokens]).numel())
    return float(used * 3 * hidden * inter * elem)


__all__ = ["A_QUANT_MAX_PAIRS", "CONFIG", "DIRECT_MAX_PAIRS", "flops", "gate_up_splits", "moe_experts", "weight_bytes"]
