"""Shared helpers for the Triton kernels: output allocation (with a poison hook for tests), device facts,
grouped tile order and FP8 row quantization."""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from dsaserve.ops import fp8 as fp8_ref
from dsaserve.ops.fp8 import AMAX_FLOOR, FP8_MAX, BlockFP8

# Tests set this to True so every output and intermediate starts as NaN (floats) or a sentinel (ints):
# any element a kernel forgets to write then shows up in the comparison with the reference.
POISON = False
INT_POISON = -123457


def new_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if dtype.is_floating_point else INT_POISON)
    return out


def stream_scratch(kind: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 zeros that kernels keep between launches and leave zeroed (split-K tickets, top-k histograms): one
    buffer per (kind, device, current stream), since kernels on two streams can run at once
    (DSAOps.side_stream) while the launches on one stream run one after another."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    return _scratch(kind, shape, device, stream)


@functools.lru_cache(maxsize=None)
def _scratch(kind: str, shape: tuple[int, ...], device: torch.device, stream: int) -> torch.Tensor:
    # Made in a capture, a buffer's zeroing would only be recorded (and its memory would come from the graph
    # pool, which other graphs' temporaries share): the graph runner warms every step on its capture stream.
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"the {kind} of stream {stream:#x} would be made inside a CUDA graph capture: run the "
                           f"captured function once eagerly on the capturing stream first")
    return torch.zeros(shape, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    return num_sms(t.device.index or 0) if t.is_cuda else 8  # CPU: the Triton interpreter (debugging)


@functools.lru_cache(maxsize=None)
def _major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def pdl(t: torch.Tensor) -> dict[str, bool]:
    """Launch options of a kernel that starts with pdl_start, for the device of t: programmatic dependent
    launch on SM90 and later (its programs are scheduled while the previous kernel finishes: a decode step
    of short kernels loses most of each launch's latency), a plain launch elsewhere."""
    on = t.is_cuda and _major(t.device.index or 0) >= 9
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First statement of every kernel launched with pdl(): wait until the previous kernel has finished and
    its writes are visible (nothing may be read or written before this), then let the next kernel's
    programs be scheduled. Every program runs it, so the chain of waits stays transitive."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def is_hopper(t: torch.Tensor) -> bool:
    """SM90: 227 KiB of shared memory per block, which the largest tile choices assume."""
    return t.is_cuda and _major(t.device.index or 0) == 9


def agrees_with_reference(device_index: int, rows: int,
                          product: Callable[[torch.Tensor, BlockFP8], torch.Tensor]) -> bool:
    """Capability probe of an FP8 GEMM path: `product` of a small random bf16 x [rows, 512] and a 256 x 512
    weight in 128 x 128 blocks is the reference's (relative error < 1e-2). Exceptions propagate: the caller
    knows which ones mean "not on this device"."""
    dev = torch.device("cuda", device_index)
    gen = torch.Generator(dev).manual_seed(0)
    w = BlockFP8(*fp8_ref.quantize_weight(torch.randn(256, 512, device=dev, generator=gen), (128, 128)), (128, 128))
    x = torch.randn(rows, 512, device=dev, generator=gen).to(torch.bfloat16)
    got = product(x, w).float()
    want = fp8_ref.linear(x, w)
    return bool(((got - want).norm() / want.norm()) < 1e-2)


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def pow2_tile(n: int) -> bool:
    """A power of two of at least 16: a tl.dot dimension loaded whole, and a group width that a power-of-two row
    block splits into (the quantization groups the norm and absorbed-product kernels write)."""
    return n >= 16 and n & (n - 1) == 0


def norm_warps(block: int) -> int:
    """Warps of a one-row-per-program kernel that norms a row of `block` values: every kernel that RMS-norms
    takes this count, so their fp32 sums reduce in the same order (bit-identical rows)."""
    return max(1, min(16, block // 512))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact IEEE products (Hopper would silently use TF32); bf16/fp16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def tile_ids(num_m_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(M block, N block) of this program: GROUP_M M blocks share each N sweep, so tiles stay in L2."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    m_blk = first_m + (pid % per_group) % group_size
    n_blk = (pid % per_group) // group_size
    return m_blk, n_blk


@triton.jit
def round_as(x, DT: tl.constexpr):
    """x (fp32) rounded to DT and back, as a torch op with DT output rounds. bf16 rounds in integer
    arithmetic: the compiler folds a plain fp32 -> bf16 -> fp32 round trip away (found on the H200)."""
    if DT == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # round to nearest even in the top 16 bits
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN (its bits would carry)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def rms_normed(x, w, N, eps, X_DT: tl.constexpr, OUT_DT: tl.constexpr):
    """w * (x / rms(x)) of one row x [BLOCK] or [BLOCK / C, C] fp32 (masked lanes 0) over its N values: fp32
    statistics, the normed value rounded to X_DT and the product to OUT_DT, as
    dsaserve.ops.fused.rms_norm_reference rounds."""
    squares = x * x
    if len(x.shape) == 2:
        squares = tl.sum(squares, 1)
    inv_rms = tl.math.rsqrt(tl.sum(squares, 0) / N + eps)
    return round_as(w * round_as(x * inv_rms, X_DT), OUT_DT)


@triton.jit
def rotate(x1, x2, cos, sin, DT: tl.constexpr):
    """Rotary of the pairs (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), fp32 values of DT with every product
    and sum rounded to DT, as Rotary.apply's torch ops round."""
    return (round_as(round_as(x1 * cos, DT) - round_as(x2 * sin, DT), DT),
            round_as(round_as(x2 * cos, DT) + round_as(x1 * sin, DT), DT))


@triton.jit
def layer_normed(x, w, b, mask, N, eps, DT: tl.constexpr):
    """(x - mean) / sqrt(var + eps) * w + b of one row x [BLOCK] fp32 over its N values (mask: those lanes; the
    biased variance, as torch's), in fp32 with one rounding to DT, as torch's LayerNorm rounds."""
    mean = tl.sum(x, 0) / N
    centered = tl.where(mask, x - mean, 0.0)
    return round_as(centered * tl.math.rsqrt(tl.sum(centered * centered, 0) / N + eps) * w + b, DT)


@triton.jit
def hadamard_rows(x, R: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """x [R, N] fp32 -> x H unscaled: the reference's butterflies in its order (stage s pairs i with i + 2^s)."""
    for stage in tl.static_range(LOG_N):  # [R, N / 2^(s + 1), 2^s, 2]: the pairs last
        pairs = tl.permute(tl.reshape(x, [R, N >> (stage + 1), 2, 1 << stage]), [0, 1, 3, 2])
        a, b = tl.split(pairs)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2]), [R, N])
    return x


_FLOOR = tl.constexpr(AMAX_FLOOR)
_QMAX = tl.constexpr(FP8_MAX)


@triton.jit
def quantize_rows(x):
    """x [R, G] fp32, one quantization group per row -> (e4m3 values, fp32 scales [R]), bit-identical to
    dsaserve.ops.fp8.act_quant: two IEEE divisions per row (div_rn, as torch divides; `/` would be the
    approximate one), then one multiply per value."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), _FLOOR)
    qmax = tl.full(amax.shape, _QMAX, tl.float32)
    scale = tl.math.div_rn(amax, qmax)
    inv = tl.math.div_rn(qmax, amax)
    q = tl.minimum(tl.maximum(x * inv[:, None], -_QMAX), _QMAX)
    return q.to(tl.float8e4nv), scale
