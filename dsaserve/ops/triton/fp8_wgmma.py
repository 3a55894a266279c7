"""Block-scaled FP8 GEMM for Hopper in Gluon (Triton's explicit-layout dialect): the scale promotion
overlapped with the tensor cores.

Same function as fp8_gemm's kernel: C = sum over K groups g of (A_g W_g^T) x a_scale[row, g] x
w_scale[col block, g], fp32 accumulation, one cast at the end. Each group's MMA goes into a fresh register
tile that is scaled into the accumulator once it retires; TMA fills a ring of STAGES shared-memory slots,
each refilled as soon as its MMA has retired. The overlap of the tensor cores with the scaling comes from
the other CTAs on the SM (64-row tiles: 149 registers and 74 KB at 3 stages, so three per SM), not from
within a warpgroup: an earlier loop that issued group g before scaling group g - 1 carried an in-flight
tile across the loop's back-edge, which ptxas serializes (warning C7514), and was 2-20% slower (H200,
docs/benchmarks.md). On an H200 at 4096 rows: 51-62% of the FP8 matmul rate (kv_a, 576 columns: 30%).

Grouped (MoE) mode: M blocks of BLOCK_M rows each belong to one expert (BLOCK_EXPERT, -1 past the
end); the weight is the experts' stack seen as [E * N, K] and its scales [E, N / 128, K / 128]. An
optional per-row multiplier (the routing weight) applies before the cast.

Operands: A e4m3 [M, K] (row stride 16-byte aligned), its scales group-major [K / 128, >= M] fp32 (one
contiguous load per group), W e4m3 with 128 x 128 blocks, BLOCK_N = BLOCK_K = 128. Hopper only; the
caller checks `applies` first.
"""
from __future__ import annotations

import functools
import logging

import torch
import triton

from dsaserve.ops import fp8 as fp8_ref
from dsaserve.ops.fp8 import FP8, BlockFP8
from dsaserve.ops.triton._common import agrees_with_reference, tile_ids

try:  # Gluon ships with recent Triton (3.6 here); without it this path is off
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the Triton build
    gluon = None

log = logging.getLogger(__name__)
Tensor = torch.Tensor
BLOCK = 128  # N and K tile = the checkpoints' weight block
# A call costs ~110-120 us of host time against ~50 us for the Triton kernel (H200 eager timings: three
# tensor descriptors per launch), so callers use it only for products of at least this many FLOP
# (~150+ us of GPU time at the rates measured), where the GPU time, not the launch, is the cost.
MIN_FLOP = 1e11


if gluon is not None:
    @gluon.jit
    def _load_group(a_desc, w_desc, bar, a_buf, w_buf, off_m, w_row, g, pred):
        mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(a_desc, [off_m, g * 128], bar, a_buf, pred=pred)
        tma.async_copy_global_to_shared(w_desc, [w_row, g * 128], bar, w_buf, pred=pred)

    @gluon.jit
    def _group_scale(AS, stride_asg, w_scale_ptr, rows, g):
        """[BLOCK_M, 1] multiplier of group g: the rows' activation scales times the weight block's."""
        a_s = gl.load(AS + g * stride_asg + rows)
        return gl.expand_dims(a_s * gl.load(w_scale_ptr + g), 1)

    # the row-count arguments are not specialized: a new batch size compiles nothing
    @gluon.jit(do_not_specialize=["num_m_blocks", "stride_asg"])
    def _wgmma_kernel(a_desc, w_desc, c_desc, AS, WS, ROW_W, BLOCK_EXPERT,
                      N, K, stride_asg, stride_wse, stride_wsn, num_m_blocks,
                      GROUPED: gl.constexpr, ROW_WEIGHT: gl.constexpr, STAGES: gl.constexpr,
                      GROUP_M: gl.constexpr, num_warps: gl.constexpr):
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        pid_m, pid_n = tile_ids(num_m_blocks, N, BLOCK_N, GROUP_M)
        expert = 0
        if GROUPED:
            expert = gl.load(BLOCK_EXPERT + pid_m)
            if expert < 0:  # past the last padded block
                return
        off_m = pid_m * BLOCK_M
        w_row = expert * N + pid_n * BLOCK_N
        w_scale_ptr = WS + expert * stride_wse + pid_n * stride_wsn

        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        groups = gl.cdiv(K, BLOCK_K)
        for s in gl.static_range(STAGES):  # groups 0 .. STAGES - 1, one per slot
            _load_group(a_desc, w_desc, bars.index(s), a_bufs.index(s), w_bufs.index(s), off_m, w_row, s,
                        s < groups)

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        acc = zero
        for g in range(0, groups):
            slot = g % STAGES
            mbarrier.wait(bars.index(slot), (g // STAGES) & 1)
            product = warpgroup_mma(a_bufs.index(slot), w_bufs.index(slot).permute((1, 0)), zero, use_acc=False,
                                    is_async=True)
            scale = _group_scale(AS, stride_asg, w_scale_ptr, rows, g)  # its latency hides behind the MMA
            product = warpgroup_mma_wait(num_outstanding=0, deps=(product,))
            _load_group(a_desc, w_desc, bars.index(slot), a_bufs.index(slot), w_bufs.index(slot), off_m, w_row,
                        g + STAGES, g + STAGES < groups)  # the slot is free: group g + STAGES goes there
            acc = acc + product * scale
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        if ROW_WEIGHT:
            acc = acc * gl.expand_dims(gl.load(ROW_W + rows), 1)
        c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, pid_n * BLOCK_N], c_smem)
        tma.store_wait(pendings=0)


@functools.lru_cache(maxsize=None)
def works(device_index: int) -> bool:
    """Gluon is there, the device is Hopper, and the kernel compiles and agrees with the reference on a
    small product: checked once per device (at load, never inside a graph capture). Gluon is an
    experimental API: a Triton it no longer fits turns this path off, not the server."""
    if gluon is None or torch.cuda.get_device_capability(device_index)[0] != 9:
        return False
    try:
        return agrees_with_reference(device_index, 70, _reference_quantized_mm)
    except Exception as exc:  # noqa: BLE001 - any compile or launch failure means: do not use it
        log.warning("the Gluon FP8 GEMM does not run here (%s: %s); prefill GEMMs cuBLAS refuses use Triton",
                    type(exc).__name__, str(exc)[:200])
        return False


def _reference_quantized_mm(x: Tensor, w: BlockFP8) -> Tensor:
    """x quantized by the reference, scales group-major over rows rounded up to the 64-row tile."""
    M, K = x.shape
    q, s = fp8_ref.act_quant(x, BLOCK)
    scales = torch.zeros(K // BLOCK, triton.cdiv(M, 64) * 64, device=x.device)
    scales[:, :M] = s.t()
    out = torch.empty(M, w.weight.shape[0], dtype=x.dtype, device=x.device)
    return block_scaled_mm(q.contiguous(), scales, w, out, block_m=64)


def applies(x: Tensor, w: BlockFP8) -> bool:
    """Hopper, 128 x 128 blocks, whole K blocks, output rows TMA can store (N a multiple of 8), the output
    dtypes tested on the GPU (bf16, fp32), and a kernel that `works` here."""
    N, K = w.weight.shape[-2:]
    return (x.is_cuda and w.block == (BLOCK, BLOCK) and K % BLOCK == 0 and N % 8 == 0 and w.weight.is_contiguous()
            and w.scale.is_contiguous() and x.dtype in (torch.bfloat16, torch.float32)
            and works(x.device.index or 0))


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32", FP8: "float8e4nv"}


def _descriptor(t: Tensor, block: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(block, getattr(gl, _GL_DTYPES[t.dtype]))
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def block_scaled_mm(a: Tensor, a_scale_gm: Tensor, w: BlockFP8, out: Tensor, *, block_m: int = 64,
                    block_expert: Tensor | None = None, row_weight: Tensor | None = None, stages: int = 3,
                    group_m: int = 8) -> Tensor:
    """out [M, N] = the block-scaled product of a (e4m3 [M, K]) and w ([N, K], or [E, N, K] with
    block_expert naming each block_m-row block's expert, -1 = skip).

    a_scale_gm: the activation scales group-major, [K / 128, >= M rounded up to block_m]. Rows of a
    tile past M read scale and row_weight entries up to the next multiple of block_m: callers size them
    so (out-of-range A rows read as zeros through TMA and their outputs are not stored)."""
    if block_m not in (64, 128) or stages < 2:  # one or two warpgroups; a ring of one slot would deadlock
        raise ValueError(f"block_scaled_mm: block_m must be 64 or 128 and stages >= 2, got {block_m}, {stages}")
    M, K = a.shape
    N = w.weight.shape[-2]
    grouped = block_expert is not None
    w2 = w.weight.reshape(-1, K)
    num_m_blocks = triton.cdiv(M, block_m) if not grouped else block_expert.numel()
    ws = w.scale if grouped else w.scale.unsqueeze(0)
    _wgmma_kernel[(num_m_blocks * triton.cdiv(N, BLOCK),)](
        _descriptor(a, [block_m, BLOCK]), _descriptor(w2, [BLOCK, BLOCK]), _descriptor(out, [block_m, BLOCK]),
        a_scale_gm, ws, row_weight if row_weight is not None else a_scale_gm,
        block_expert if grouped else a_scale_gm, N, K, a_scale_gm.stride(0), ws.stride(0), ws.stride(1),
        num_m_blocks, GROUPED=grouped, ROW_WEIGHT=row_weight is not None,
        STAGES=stages, GROUP_M=group_m, num_warps=block_m // 16)
    return out


__all__ = ["MIN_FLOP", "applies", "block_scaled_mm", "works"]
