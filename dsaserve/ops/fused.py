"""Row glue the model calls: RMSNorm, in-place rotary, grouped top-k routing.

Each function is the reference math, and on CUDA one Triton kernel (dsaserve.ops.triton.fused) where its
shape constraints hold; the kernel rounds where this code rounds (tests/test_fused_ops.py holds them equal).
"""
from __future__ import annotations

import torch

from dsaserve.model.rope import Rotary

Tensor = torch.Tensor


def _kernels():  # imported lazily: needs CUDA + Triton
    from dsaserve.ops.triton import fused
    return fused


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x / rms(x)) over the last dim: fp32 statistics, the normed value rounded to x's dtype."""
    if x.is_cuda:
        return _kernels().rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rope_(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate x [T, D] or [T, H, D] in place (Rotary.apply's values and half-split output order) with
    cos/sin [T, D / 2] of each row's position; returns x."""
    if x.is_cuda and _kernels().rope_applies(x, cos, sin):
        return _kernels().rope_(x, cos, sin, interleaved)
    if x.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x.copy_(Rotary.apply(x, cos, sin, interleaved))


def route_reference(logits: Tensor, bias: Tensor, n_group: int, topk_group: int, k: int, normalize: bool,
                    scale: float) -> tuple[Tensor, Tensor]:
    N, E = logits.shape
    scores = logits.sigmoid()
    choice = scores + bias
    if n_group > 1:
        groups = choice.view(N, n_group, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(E // n_group, 1), float("-inf"))
    ids = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scale


def route(logits: Tensor, bias: Tensor, n_group: int, topk_group: int, k: int, normalize: bool,
          scale: float) -> tuple[Tensor, Tensor]:
    """Sigmoid scores of fp32 router logits [N, E]; experts are chosen by score + bias among the
    `topk_group` best groups (a group's value: its two best choices) -> (ids [N, k] int64, weights [N, k]
    fp32: the chosen scores, normalized to sum 1 if `normalize`, times `scale`)."""
    if logits.is_cuda and _kernels().route_applies(logits, bias, n_group, k):
        return _kernels().route(logits, bias, n_group, topk_group, k, normalize, scale)
    return route_reference(logits, bias, n_group, topk_group, k, normalize, scale)
