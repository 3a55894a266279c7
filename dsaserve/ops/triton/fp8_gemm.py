"""Block-scaled FP8 GEMM: y = x W^T with W e4m3 in blocks of (bn x bk) fp32 multipliers.

Semantics (dsaserve.ops.fp8.linear is the reference): x is quantized per row and per group of bk
channels to e4m3 with scale amax / 448; each K group's e4m3 product is accumulated in fp32 and
scaled by (activation scale x weight block scale); the output is cast once to x's dtype.

Three shapes of work: one row (a Triton GEMV), decode and prefill rows (one tiled Triton kernel, and two faster
paths for prefill rows):
* one row (a batch-1 decode step): `_gemv_kernel`, no tensor cores and no split-K: each program reads a few
  whole weight rows in wide chunks, all of K in one or a few loads, so the call costs the launch, about one
  memory round trip and the bytes (the split-K tile kernel pays a pipeline fill and a partial-sum round trip:
  0.7-2.4 us more on a `--tp 8` rank's attention projections, H100). From two rows the tile kernel wins.
* decode (M <= 64): bandwidth-bound on the weight bytes. Few rows, so each program streams a
  BLOCK_N-row strip of W over a range of K groups (split-K when N alone gives too few programs;
  the last program of each tile sums the fp32 partials: one launch). Up to 16 rows quantize x inside
  the kernel (no extra launch); more rows are quantized once up front.
* prefill (M > 64): compute-bound. x is quantized once by `act_quant` (one read of x), then
  128 x 128 tiles, programs grouped along M so weight strips stay in L2. From CUBLAS_MIN_M rows on,
  where torch offers it, cuBLAS's block-scaled FP8 GEMM (1 x 128 activation and 128 x 128 weight
  scales: the same function) runs the product instead: it overlaps each K group's scaling with the
  next group's MMAs (warp specialization), which a Triton 3.6 loop on Hopper cannot
  (docs/benchmarks.md: the same loop without the scaling runs at 80-96% of the FP8 rate). Where cuBLAS
  refuses the shape (K blocks not a multiple of 4, ...) and the product is large, fp8_wgmma's Gluon
  kernel does the same overlap in software (1.2-1.35x the Triton kernel at 4096 rows).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dsaserve.ops.fp8 import CUBLAS_MIN_M, FP8, BlockFP8, QuantizedRows, gemm_tier
from dsaserve.ops.triton import fp8_wgmma
from dsaserve.ops.triton._common import (agrees_with_reference, new_empty, next_pow2, pdl, pdl_start, quantize_rows,
                                         sm_count, stream_scratch, tile_ids)

Tensor = torch.Tensor
K_BLOCKS = (32, 64, 128, 256)  # weight K blocks the kernel takes: one K step each (e4m3 dots need K >= 32)
QUANTIZED_INPUT_MAX_M = 64  # rows up to which producers hand fp8_linear / the MoE their rows quantized (xq)


@triton.jit(do_not_specialize=["M", "stride_sg"])
def _act_quant_kernel(X, Q, S, M, K, stride_x, stride_q, stride_s, stride_sg,
                      GROUP: tl.constexpr, GROUPS: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < K
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    q, scale = quantize_rows(x)
    tl.store(Q + row * stride_q + cols, q, mask=mask)
    tl.store(S + row * stride_s + g * stride_sg, scale, mask=g * GROUP < K)


@triton.jit
def _gemv_kernel(X, XS, W, WS, C, N, K, stride_wn, stride_wsn,
                 BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, BK: tl.constexpr, SCALE_N: tl.constexpr,
                 A_QUANT: tl.constexpr, PDL: tl.constexpr):
    """One row: C[n] = sum over K groups g of (xq_g . wq_ng) x_scale_g w_scale_ng, GROUPS groups of BK per
    load. A_QUANT: X is the unquantized row and each chunk is quantized here (act_quant's bits); else X, XS
    are its e4m3 values and scales."""
    pdl_start(PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.arange(0, GROUPS)
    k = g[:, None] * BK + tl.arange(0, BK)[None, :]  # [GROUPS, BK]
    n_ok = cols < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, GROUPS * BK):
        k_ok = k0 + k < K
        g_ok = k0 + g * BK < K
        if A_QUANT:
            a, a_s = quantize_rows(tl.load(X + k0 + k, mask=k_ok, other=0.0).to(tl.float32))
        else:
            a = tl.load(X + k0 + k, mask=k_ok, other=0.0)
            a_s = tl.load(XS + k0 // BK + g, mask=g_ok, other=0.0)
        w = tl.load(W + cols.to(tl.int64)[:, None, None] * stride_wn + (k0 + k)[None, :, :],
                    mask=n_ok[:, None, None] & k_ok[None, :, :], other=0.0)
        w_s = tl.load(WS + (cols // SCALE_N).to(tl.int64)[:, None] * stride_wsn + k0 // BK + g[None, :],
                      mask=n_ok[:, None] & g_ok[None, :], other=0.0)
        part = tl.sum(w.to(tl.float32) * a.to(tl.float32)[None, :, :], 2)  # [BLOCK_N, GROUPS]
        acc += tl.sum(part * (w_s * a_s[None, :]), 1)
    tl.store(C + cols, acc.to(C.dtype.element_ty), mask=n_ok)


def _gemv(x: Tensor, xq: QuantizedRows | None, w: BlockFP8, cfg: dict[str, int]) -> Tensor:
    """x [1, K] (or its quantized row xq) times the weight -> [1, N]."""
    N, K = w.weight.shape
    out = new_empty((1, N), x.dtype, x.device)
    block_k = w.block[1]
    groups = max(1, min(cfg["gemv_k"] // block_k, next_pow2(triton.cdiv(K, block_k), 1)))
    a, a_s = (xq.values, xq.scales) if xq is not None else (x, x)
    _gemv_kernel[(triton.cdiv(N, cfg["gemv_block_n"]),)](
        a, a_s, w.weight, w.scale, out, N, K, w.weight.stride(0), w.scale.stride(0),
        BLOCK_N=cfg["gemv_block_n"], GROUPS=groups, BK=block_k, SCALE_N=w.block[0], A_QUANT=xq is None,
        num_warps=cfg["gemv_warps"], **pdl(x))
    return out


# The GEMV's weight rows per program, K values per load (a power of two, at least the weight's K block) and warps:
# 8 warps while the weight has few rows (few programs: q_b at tp 8, 3072 rows), 4 from GEMV_FEW_WARPS_N rows, where
# programs are plentiful and more of them fit an SM (H100 sweeps, docs/benchmarks.md: o_proj 7168 x 16384
# 50.96 -> 46.94 us, q_b 24576 x 1536 20.84 -> 18.74; q_b 3072 x 1536 3.89 us with 8, 4.04 with 4).
GEMV_BLOCK_N, GEMV_K, GEMV_FEW_WARPS_N = 4, 2048, 4096

MAX_TILES = 16384  # output tiles a split-K launch may have: one int32 ticket each (64 KiB per stream)


def _tickets(device: torch.device) -> Tensor:
    """The split-K tickets of the current stream, all 0 between launches (each launch's last programs reset
    theirs)."""
    return stream_scratch("split-K tickets", (MAX_TILES,), device)


@triton.jit(do_not_specialize=["M", "groups_per_split"])
def _gemm_kernel(A, AS, W, WS, C, P, TICKETS, M, N, K, num_groups, groups_per_split,
                 stride_am, stride_asm, stride_wn, stride_wsn, stride_cm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_N: tl.constexpr,
                 GROUP_M: tl.constexpr, A_QUANT: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 PDL: tl.constexpr):
    pdl_start(PDL)
    pid_m, pid_n = tile_ids(tl.cdiv(M, BLOCK_M), N, BLOCK_N, GROUP_M)
    split = tl.program_id(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rows < M
    n_mask = cols < N
    kk = tl.arange(0, BLOCK_K)
    g0 = split * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, num_groups)
    a_ptr = A + rows.to(tl.int64)[:, None] * stride_am + (g0 * BLOCK_K + kk)[None, :]
    w_ptr = W + cols.to(tl.int64)[None, :] * stride_wn + (g0 * BLOCK_K + kk)[:, None]
    as_ptr = AS + rows.to(tl.int64) * stride_asm + g0
    ws_ptr = WS + (cols // SCALE_N).to(tl.int64) * stride_wsn + g0
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(g0, g1):
        if EVEN_K:
            a_mask = m_mask[:, None]
            w_mask = n_mask[None, :]
        else:
            k_ok = g * BLOCK_K + kk < K
            a_mask = m_mask[:, None] & k_ok[None, :]
            w_mask = n_mask[None, :] & k_ok[:, None]
        if A_QUANT:
            a, a_s = quantize_rows(tl.load(a_ptr, mask=a_mask, other=0.0).to(tl.float32))
        else:
            a = tl.load(a_ptr, mask=a_mask, other=0.0)
            a_s = tl.load(as_ptr, mask=m_mask, other=0.0)
        w = tl.load(w_ptr, mask=w_mask, other=0.0)
        w_s = tl.load(ws_ptr, mask=n_mask, other=0.0)
        acc += tl.dot(a, w) * (a_s[:, None] * w_s[None, :])
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
        as_ptr += 1
        ws_ptr += 1
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K:
        _finish_split(acc, P, C, TICKETS + tl.program_id(0), rows, cols, mask, M, N, stride_cm)
    else:
        tl.store(C + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :], acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _finish_split(acc, P, C, ticket, rows, cols, mask, M, N, stride_cm):
    """Split-K without a second launch: every program stores its fp32 partial and takes a ticket for its
    tile; the last to arrive sums the tile's partials in split order (the same sum, bit for bit, whichever
    program is last) into C and puts the ticket back to 0 for the next launch (CUDA graph replays included).
    The barrier and the acq_rel ticket publish this program's partial before the count shows it (as a
    CUTLASS semaphore does); .cg loads read the others' from L2, never a stale L1 line of an earlier use."""
    split, splits = tl.program_id(1), tl.num_programs(1)
    stride_s = M.to(tl.int64) * N
    tile = rows[:, None] * N + cols[None, :]  # int32 (fp8_linear keeps M x N below 2^31): int64 offsets held
    tl.store(P + split * stride_s + tile, acc, mask=mask)  # 32 more registers, past three CTAs per SM
    tl.debug_barrier()
    if tl.atomic_add(ticket, 1, sem="acq_rel") == splits - 1:
        total = tl.zeros_like(acc)
        for s in range(splits):
            total += tl.load(P + s * stride_s + tile, mask=mask, other=0.0, cache_modifier=".cg")
        out = C + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
        tl.store(out, total.to(C.dtype.element_ty), mask=mask)
        tl.store(ticket, 0)


def act_quant(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """x [M, K] (row stride free, unit column stride) -> e4m3 [M, K] and fp32 scales [M, ceil(K / group)].
    Bit-identical to dsaserve.ops.fp8.act_quant."""
    M, K = x.shape
    q = new_empty((M, K), FP8, x.device)
    s = new_empty((M, triton.cdiv(K, group)), torch.float32, x.device)
    _quantize_into(x, q, s, group)
    return q, s


def _quantize_into(x: Tensor, q: Tensor, s: Tensor, group: int) -> None:
    """act_quant's values into q [>= M, K] and scales into s [>= M, groups] of any strides (cuBLAS wants
    them group-major)."""
    M, K = x.shape
    num_groups = triton.cdiv(K, group)
    if M == 0:
        return
    groups = max(1, min(next_pow2(num_groups, 1), 4096 // group))  # ~4096 values per program
    _act_quant_kernel[(M, triton.cdiv(num_groups, groups))](
        x, q, s, M, K, x.stride(0), q.stride(0), s.stride(0), s.stride(1), GROUP=group, GROUPS=groups,
        num_warps=4, **pdl(x))


@functools.lru_cache(maxsize=None)
def cublas_blockwise_works(device_index: int) -> bool:
    """Whether torch runs cuBLAS's 1x128 x 128x128 block-scaled FP8 GEMM on this device (Hopper with
    CUDA >= 12.9) and it agrees with the reference on a small product: checked once per device."""
    if not hasattr(F, "scaled_mm") or torch.cuda.get_device_capability(device_index)[0] != 9:
        return False
    try:
        return agrees_with_reference(device_index, 6, _cublas_linear)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        return False


def cublas_applies(x: Tensor, w: BlockFP8) -> bool:
    """cuBLAS takes 128 x 128 weight blocks, whole K blocks, scale leading dimensions of 16 bytes (the
    weight's K-block count a multiple of 4), N a multiple of 16 and a dense weight and scale; the output
    dtypes tested on the GPU are bf16 and fp32."""
    N, K = w.weight.shape
    return (x.is_cuda and w.block == (128, 128) and K % 512 == 0 and N % 16 == 0 and w.weight.is_contiguous()
            and w.scale.is_contiguous() and x.dtype in (torch.bfloat16, torch.float32)
            and cublas_blockwise_works(x.device.index or 0))


def _quantize_group_major(x2: Tensor, q_rows: int, s_rows: int) -> tuple[Tensor, Tensor]:
    """x2 [M, K] -> e4m3 [q_rows, K] and fp32 scales group-major [K / 128, s_rows] (rows >= M unwritten)."""
    K = x2.shape[1]
    q = new_empty((q_rows, K), FP8, x2.device)
    s = new_empty((K // 128, s_rows), torch.float32, x2.device)
    _quantize_into(x2, q, s.t(), 128)
    return q, s


def _cublas_linear(x2: Tensor, w: BlockFP8) -> Tensor:
    """x2 [M, K] -> [M, N] through torch's block-scaled scaled_mm: our bit-exact activation quantization
    (rows padded to a multiple of 4, scales stored group-major as cuBLAS reads them), the weight as
    it is (its transpose is the column-major operand cuBLAS wants)."""
    M, K = x2.shape
    rows = -(-M // 4) * 4  # the padding rows' outputs are computed from whatever is there and dropped
    q, s = _quantize_group_major(x2, rows, rows)
    out = F.scaled_mm(q, w.weight.t(), s.t(), F.ScalingType.BlockWise1x128, w.scale.t(),
                      F.ScalingType.BlockWise128x128, output_dtype=x2.dtype)
    return out[:M]


def _wgmma_linear(x2: Tensor, w: BlockFP8, block_m: int, stages: int) -> Tensor:
    """x2 [M, K] -> [M, N] through fp8_wgmma: scales group-major over rows rounded up to block_m."""
    M = x2.shape[0]
    q, s = _quantize_group_major(x2, M, -(-M // block_m) * block_m)  # TMA reads rows past M as zeros
    out = new_empty((M, w.weight.shape[0]), x2.dtype, x2.device)
    return fp8_wgmma.block_scaled_mm(q, s, w, out, block_m=block_m, stages=stages)


def balanced_splits(tiles: int, groups: int, sms: int, max_programs: int) -> int:
    """Split-K count for few-row GEMMs: the one whose programs (tiles x splits) spread most evenly over the
    SMs (the busiest SM's share, ceil(P / sms), sets the time), at least 4 K groups per split (shorter ones
    spend their time filling the pipeline: 2-group splits were 25% slower on TP-8 shapes) and at most
    max_programs; near-ties go to fewer programs (fewer partials to sum). At least 1.5 programs per SM when
    any split gives that: one 3-stage strip per SM keeps too few bytes in flight."""
    options = []
    for per in range(groups, min(4, groups) - 1, -1):
        programs = tiles * -(-groups // per)
        if programs <= max_programs:
            options.append((programs / sms / -(-programs // sms), programs, per))
    if not options:
        return 1
    options = [o for o in options if 2 * o[1] >= 3 * sms] or options
    best = max(o[0] for o in options)
    per = min((o for o in options if o[0] >= best - 0.02), key=lambda o: o[1])[2]
    return -(-groups // per)


@functools.lru_cache(maxsize=4096)
def default_config(M: int, N: int, K: int, block_k: int, sms: int) -> dict[str, int]:
    """Tile choice: weight streaming with split-K for decode rows, 128 x 128 tiles for prefill.
    Cached per shape (the decode hot path); callers copy before changing it."""
    groups = triton.cdiv(K, block_k)
    # Decode rules from H200 sweeps (benchmarks/fp8_decode.py --sweep; docs/benchmarks.md). Up to 16 rows:
    # strips of 128 columns for wide weights, 3 stages (45 KiB of shared memory) and the split that
    # spreads the programs most evenly (o_proj 7168 x 16384: 7 splits, 392 programs, 58% -> 67% of
    # copy bandwidth). From 17 rows: ~2 programs per SM through split-K, and no split when the tiles alone
    # fill a wave and each program's K range is short (partials of 64 rows cost bytes).
    tier = gemm_tier(M)
    gemv = tier == 0  # one row: the GEMV (its fields below); the tile fields are the 2-16 rows' (config overrides)
    tier = max(tier - 1, 0)
    if tier == 0:
        block_n = 128 if N >= 4096 else 64
        cfg = dict(block_m=16, block_n=block_n, num_warps=4, num_stages=3, group_m=1, a_quant=1,
                   splits=balanced_splits(triton.cdiv(N, block_n), groups, sms, 6 * sms))
    elif tier <= 2:
        cfg = dict(block_m=32 if tier == 1 else 64, block_n=64, num_warps=4, num_stages=4, group_m=1, a_quant=0)
        tiles = triton.cdiv(N, 64)
        one_wave = 4 * tiles >= 3 * sms and groups <= 16
        cfg["splits"] = 1 if one_wave else max(1, min(groups, round(2 * sms / tiles)))
    elif tier <= 4:
        cfg = dict(block_m=64, block_n=128, num_warps=4, num_stages=4, group_m=8, a_quant=0, splits=1)
    else:
        cfg = dict(block_m=128, block_n=128, num_warps=8, num_stages=3, group_m=8, a_quant=0, splits=1)
    # From CUBLAS_MIN_M rows: cuBLAS where cublas_applies, else for products of fp8_wgmma.MIN_FLOP or more
    # the pipelined Gluon kernel where it applies (H200, 4096 rows: 51-62% of the FP8 rate, kv_a 30%;
    # Triton 20-47%; 64-row tiles and 3 stages, three CTAs per SM, fastest on the shapes cuBLAS refuses),
    # else Triton. 0 turns a path off.
    wgmma = tier >= 4 and 2.0 * M * N * K >= fp8_wgmma.MIN_FLOP
    cfg.update(cublas=int(tier >= 4), wgmma=int(wgmma), wgmma_block_m=64, wgmma_stages=3, gemv=int(gemv),
               gemv_block_n=GEMV_BLOCK_N, gemv_k=GEMV_K, gemv_warps=4 if N >= GEMV_FEW_WARPS_N else 8)
    return cfg


def fp8_linear(x: Tensor, w: BlockFP8, checks: bool = False, config: dict[str, int] | None = None,
               xq: QuantizedRows | None = None) -> Tensor:
    """x [..., K] (bf16 / fp16 / fp32) times the block-FP8 weight [N, K] -> [..., N] in x's dtype.

    Any M, N and K: rows, columns and the last K group are masked; the weight's K block must be one
    of K_BLOCKS (the checkpoints' 128 is). `config` overrides default_config's fields (benchmarks).
    xq: x's rows already quantized (act_quant's values, by the kernel that wrote x): the Triton kernel reads
    them instead of quantizing x (the cuBLAS and wgmma paths, for prefill rows, quantize x themselves)."""
    N, K = w.weight.shape
    lead = x.shape[:-1]
    if checks:
        w.check("fp8_linear weight")
        if x.shape[-1] != K:
            raise ValueError(f"fp8_linear: x has {x.shape[-1]} input features, the weight {K}")
        if not (w.weight.device == x.device == w.scale.device and w.weight.stride(-1) == 1):
            raise ValueError(f"fp8_linear: x on {x.device}, weight on {w.weight.device} (column stride "
                             f"{w.weight.stride(-1)}, must be 1), scale on {w.scale.device}")
    if w.block[1] not in K_BLOCKS:
        raise ValueError(f"fp8_linear: weight K block {w.block[1]} is not one of {K_BLOCKS}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if checks and xq is not None:
        xq.check("fp8_linear xq", M, K, w.block[1])
    if M == 0:
        return new_empty((M, N), x.dtype, x.device).view(*lead, N)
    block_k = w.block[1]
    cfg = {**default_config(M, N, K, block_k, sm_count(x2)), **(config or {})}
    if cfg["gemv"] and M == 1:
        return _gemv(x2, xq, w, cfg).view(*lead, N)
    if cfg["cublas"] and cublas_applies(x2, w):
        return _cublas_linear(x2, w).view(*lead, N)
    if cfg["wgmma"] and fp8_wgmma.applies(x2, w):
        return _wgmma_linear(x2, w, cfg["wgmma_block_m"], cfg["wgmma_stages"]).view(*lead, N)
    out = new_empty((M, N), x.dtype, x.device)
    num_groups = triton.cdiv(K, block_k)
    per_split = triton.cdiv(num_groups, cfg["splits"])
    splits = triton.cdiv(num_groups, per_split)
    if xq is not None:
        a, a_s = xq.values, xq.scales
    elif cfg["a_quant"]:
        a, a_s = x2, x2  # a_s unused: the kernel quantizes each K group itself
    else:
        a, a_s = act_quant(x2, block_k)
    grid = (triton.cdiv(M, cfg["block_m"]) * triton.cdiv(N, cfg["block_n"]), splits)
    if grid[0] > MAX_TILES or M * N >= 2**31:
        grid = (grid[0], 1)  # more tiles than tickets (or int32 tile offsets): no split (the tiles fill the SMs)
        per_split = num_groups
    split_k = grid[1] > 1
    partials = new_empty((grid[1], M, N), torch.float32, x.device) if split_k else out
    tickets = _tickets(x.device) if split_k else out
    _gemm_kernel[grid](
        a, a_s, w.weight, w.scale, out, partials, tickets, M, N, K, num_groups,
        per_split, a.stride(0), a_s.stride(0), w.weight.stride(0), w.scale.stride(0), N,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=block_k, SCALE_N=w.block[0],
        GROUP_M=cfg["group_m"], A_QUANT=a.dtype != FP8, EVEN_K=K % block_k == 0, SPLIT_K=split_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl(a))
    return out.view(*lead, N)


def weight_bytes(N: int, K: int, block: tuple[int, int]) -> int:
    return N * K + 4 * triton.cdiv(N, block[0]) * triton.cdiv(K, block[1])


__all__ = ["CUBLAS_MIN_M", "K_BLOCKS", "QUANTIZED_INPUT_MAX_M", "act_quant", "cublas_applies", "cublas_blockwise_works",
           "default_config", "fp8_linear", "weight_bytes"]
