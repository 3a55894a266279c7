"""Rotary embeddings: default and YaRN frequencies; interleaved-pair and half-split layouts."""
from __future__ import annotations

import math

import torch

from dsaserve.config import RopeConfig
from dsaserve.ops import invariant

Tensor = torch.Tensor


def inv_frequencies(rope: RopeConfig, dim: int) -> Tensor:
    """Per-pair inverse frequencies [dim // 2] (YaRN blends interpolation and extrapolation)."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.kind == "default":
        return 1.0 / pos_freqs

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (rope.factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation


class Rotary:
    """cos/sin per position; applied with `apply(x, cos, sin, interleaved)` on the last dim."""

    def __init__(self, rope: RopeConfig, dim: int, device: torch.device):
        self.inv_freq = inv_frequencies(rope, dim).to(device)
        self.scale = rope.cos_sin_scale

    def cos_sin(self, positions: Tensor, dtype: torch.dtype, batch_invariant: bool = False) -> tuple[Tensor, Tensor]:
        """batch_invariant: cos / sin by ops.invariant.pointwise (alike wherever a row is)."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        if batch_invariant:
            cos, sin = invariant.pointwise(torch.cos, angles), invariant.pointwise(torch.sin, angles)
        else:
            cos, sin = angles.cos(), angles.sin()
        return (cos * self.scale).to(dtype), (sin * self.scale).to(dtype)

    @staticmethod
    def apply(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
        """Rotate pairs of the last dim. Interleaved pairs are (0,1),(2,3)..., half-split pairs (i, i+d/2).

        The output is always half-split ordered (rotated evens, then odds): q and k get the same
        permutation, so their dot products equal those of the checkpoint's native layout.
        """
        if interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
