"""Fused row glue of the DSA layer: RMSNorm, in-place rotary and grouped top-k routing, one launch each.

In eager torch each is 7-20 small kernels (a decode step of the 3-layer benchmark model launched about
490 kernels, a third of its time on ones under 3 us). Each kernel here rounds where the reference
(dsaserve.ops.fused) rounds, so its output equals the reference's up to the order of one fp32 sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.ops.triton._common import next_pow2

Tensor = torch.Tensor


@triton.jit
def _round(x, DT: tl.constexpr):
    """x (fp32) rounded to DT and back, as a torch op with DT output rounds. bf16 rounds in integer
    arithmetic: the compiler folds a plain fp32 -> bf16 -> fp32 round trip away (found on the H200)."""
    if DT == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # round to nearest even in the top 16 bits
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def _rms_norm_kernel(X, W, OUT, stride_x, stride_o, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK)
    mask = d < N
    x = tl.load(X + row * stride_x + d, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, 0) / N + eps)
    normed = _round(x * inv_rms, X.dtype.element_ty)  # the reference rounds here (.to(x.dtype))
    w = tl.load(W + d, mask=mask, other=0.0).to(tl.float32)
    out = _round(w * normed, OUT.dtype.element_ty).to(OUT.dtype.element_ty)
    tl.store(OUT + row * stride_o + d, out, mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x / rms(x)) over the last dim, in fp32, as dsaserve.ops.fused.rms_norm_reference."""
    n = x.shape[-1]
    rows = x.reshape(-1, n) if x.stride(-1) == 1 else x.contiguous().reshape(-1, n)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.shape[0]:
        block = next_pow2(n)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, rows.stride(0), n, n, eps,
                                           BLOCK=block, num_warps=max(1, min(16, block // 512)))
    return out


@triton.jit
def _rope_kernel(X, COS, SIN, stride_t, stride_h, stride_c, stride_s, H,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, HALF)
    cos = tl.load(COS + t * stride_c + i).to(tl.float32)[None, :]
    sin = tl.load(SIN + t * stride_s + i).to(tl.float32)[None, :]
    base = X + t * stride_t + h[:, None].to(tl.int64) * stride_h
    mask = (h < H)[:, None]
    if INTERLEAVED:
        first, second = base + 2 * i[None, :], base + 2 * i[None, :] + 1
    else:
        first, second = base + i[None, :], base + HALF + i[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
    dt = X.dtype.element_ty  # every product and sum rounds to x's dtype, as the reference's ops do
    y1 = _round(_round(x1 * cos, dt) - _round(x2 * sin, dt), dt).to(dt)
    y2 = _round(_round(x2 * cos, dt) + _round(x1 * sin, dt), dt).to(dt)
    tl.store(base + i[None, :], y1, mask=mask)  # half-split order (Rotary.apply)
    tl.store(base + HALF + i[None, :], y2, mask=mask)


def rope_(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate x [T, D] or [T, H, D] (last dim contiguous) in place with cos/sin [T, D/2]; see
    dsaserve.ops.fused.rope_. Returns x."""
    rows = x if x.dim() == 3 else x[:, None]
    T, H, D = rows.shape
    if T:
        block_h = min(next_pow2(H, 1), 16)
        _rope_kernel[(T, triton.cdiv(H, block_h))](rows, cos, sin, rows.stride(0), rows.stride(1), cos.stride(0),
                                                   sin.stride(0), H, HALF=D // 2, BLOCK_H=block_h,
                                                   INTERLEAVED=interleaved, num_warps=1 if H < 8 else 4)
    return x


def rope_applies(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    D = x.shape[-1]
    return (x.dim() in (2, 3) and x.stride(-1) == 1 and D >= 2 and D & (D - 1) == 0 and x.dtype == cos.dtype
            == sin.dtype and cos.shape == sin.shape == (x.shape[0], D // 2) and cos.stride(-1) == sin.stride(-1) == 1)


@triton.jit
def _argmax_2d(x, index, NONE: tl.constexpr):
    """The lowest index among the largest values of a 2-d block (torch.topk's pick among equals)."""
    best = tl.max(tl.max(x, 1), 0)
    return tl.min(tl.min(tl.where(x == best, index, NONE), 1), 0)


@triton.jit
def _route_kernel(LOGITS, BIAS, IDS, WEIGHTS, stride_l, scale,
                  GROUPS: tl.constexpr, PER_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
                  K_POW2: tl.constexpr, NORMALIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GROUPS)
    j = tl.arange(0, PER_GROUP)
    expert = g[:, None] * PER_GROUP + j[None, :]
    E: tl.constexpr = GROUPS * PER_GROUP
    score = tl.sigmoid(tl.load(LOGITS + row * stride_l + expert))
    choice = score + tl.load(BIAS + expert)
    if GROUPS > 1:  # a group's score is the sum of its two best choices; keep the TOPK_GROUP best groups
        best = tl.max(choice, 1)
        first = tl.min(tl.where(choice == best[:, None], j[None, :], PER_GROUP), 1)
        second = tl.max(tl.where(j[None, :] == first[:, None], float("-inf"), choice), 1)
        group_score = best + second
        keep = g < 0
        for _ in tl.static_range(TOPK_GROUP):
            left = tl.where(keep, float("-inf"), group_score)
            top = tl.max(left, 0)
            keep = keep | (g == tl.min(tl.where(left == top, g, GROUPS), 0))
        choice = tl.where(keep[:, None], choice, float("-inf"))
    slot = tl.arange(0, K_POW2)
    ids = tl.zeros([K_POW2], dtype=tl.int64)
    weights = tl.zeros([K_POW2], dtype=tl.float32)
    for k in tl.static_range(K):
        pick = _argmax_2d(choice, expert, E)
        ids = tl.where(slot == k, pick, ids)
        weights = tl.where(slot == k, tl.sum(tl.sum(tl.where(expert == pick, score, 0.0), 1), 0), weights)
        choice = tl.where(expert == pick, float("-inf"), choice)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, 0) + 1e-20)
    tl.store(IDS + row * K + slot, ids, mask=slot < K)
    tl.store(WEIGHTS + row * K + slot, weights * scale, mask=slot < K)


def route(logits: Tensor, bias: Tensor, n_group: int, topk_group: int, k: int, normalize: bool,
          scale: float) -> tuple[Tensor, Tensor]:
    """Grouped top-k routing of fp32 router logits [N, E]; see dsaserve.ops.fused.route_reference."""
    N, E = logits.shape
    ids = torch.empty(N, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(N, k, dtype=torch.float32, device=logits.device)
    if N:
        _route_kernel[(N,)](logits, bias, ids, weights, logits.stride(0), scale, GROUPS=n_group,
                            PER_GROUP=E // n_group, TOPK_GROUP=topk_group, K=k, K_POW2=next_pow2(k, 2),
                            NORMALIZE=normalize, num_warps=4)
    return ids, weights


def route_applies(logits: Tensor, bias: Tensor, n_group: int, k: int) -> bool:
    E = logits.shape[1]
    per_group = E // max(n_group, 1)
    return (logits.dtype == bias.dtype == torch.float32 and logits.stride(1) == 1 and bias.is_contiguous()
            and n_group >= 1 and E % n_group == 0 and n_group & (n_group - 1) == 0
            and per_group & (per_group - 1) == 0 and k <= E)


__all__ = ["rms_norm", "rope_", "rope_applies", "route", "route_applies"]
