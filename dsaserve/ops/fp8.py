"""Block-scaled FP8 (e4m3) weights and the plain-PyTorch reference of the FP8 kernels.

Format (the official DeepSeek-V3.2 / GLM-5 checkpoints): an e4m3 weight [..., N, K] and fp32
multipliers `weight_scale_inv` [..., ceil(N / bn), ceil(K / bk)], one per block of bn x bk values.

Kernel semantics, which `linear` and `moe_experts`' FP8 path emulate exactly up to accumulation
order: activations are quantized on the fly per row and per group of bk channels (the weight's K
block, 128 in the checkpoints) to e4m3 values x * (448 / amax) with the fp32 scale amax / 448;
every K group's product is accumulated in fp32 times (activation scale x weight block scale); the
output is cast once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsaserve.ops import invariant

Tensor = torch.Tensor
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-10  # an all-zero group gets a tiny scale (and zeros), never a division by zero


CUBLAS_MIN_M = 96  # rows from which cuBLAS's block-scaled GEMM runs where it applies (1.2-2x faster from 96 on, H200)
GEMM_TIER_TOPS = (1, 16, 32, 64, CUBLAS_MIN_M - 1, 512)  # the last row count of each tier but the last


def gemm_tier(rows: int) -> int:
    """The tile family the FP8 GEMM (ops/triton/fp8_gemm.default_config) runs `rows` rows with: 0 the one-row GEMV,
    1-3 the decode tiles of 16, 32 and 64 rows, 4 the 64 x 128 tile below CUBLAS_MIN_M, 5 cuBLAS where it applies
    (else that tile) up to 512 rows, 6 the 128 x 128 prefill tile. Eager steps of any size take them, so the
    start-up warm-up runs a prompt in every tier (engine/warmup.py)."""
    return next((tier for tier, top in enumerate(GEMM_TIER_TOPS) if rows <= top), len(GEMM_TIER_TOPS))


@dataclass(frozen=True)
class BlockFP8:
    """An e4m3 matrix, or a stack of them [E, N, K], with its fp32 block multipliers."""
    weight: Tensor
    scale: Tensor  # weight_scale_inv: [..., ceil(N / block[0]), ceil(K / block[1])]
    block: tuple[int, int]

    def __getitem__(self, index: int) -> BlockFP8:
        return BlockFP8(self.weight[index], self.scale[index], self.block)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def dequantize(self, dtype: torch.dtype = torch.float32, max_values: int = 1 << 24) -> Tensor:
        """The weight in `dtype`, computed a run of whole row blocks at a time (at most about `max_values`
        values): in one piece a stack of experts took 12 bytes of fp32 temporaries per value (a 4.6 GB FP8
        checkpoint ran a 23 GB host out of memory)."""
        n, k = self.weight.shape[-2:]
        weights, scales = self.weight.reshape(-1, n, k), self.scale.reshape(-1, *self.scale.shape[-2:])
        out = torch.empty(weights.shape, dtype=dtype, device=self.weight.device)
        rows = self.block[0] * max(1, max_values // (self.block[0] * k))
        for matrix in range(weights.shape[0]):
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                blocks = scales[matrix, start // self.block[0]:-(-stop // self.block[0])]
                out[matrix, start:stop] = dequantize(weights[matrix, start:stop], blocks, self.block).to(dtype)
        return out.view(self.weight.shape)

    def check(self, what: str) -> None:
        """Shapes and dtypes agree (cheap: no device work). Raises ValueError naming `what`."""
        *lead, n, k = self.weight.shape
        want = (*lead, math.ceil(n / self.block[0]), math.ceil(k / self.block[1]))
        if self.weight.dtype != FP8 or self.scale.dtype != torch.float32:
            raise ValueError(f"{what}: weight must be {FP8} and scale float32, got {self.weight.dtype}, "
                             f"{self.scale.dtype}")
        if self.weight.stride(-1) != 1 or self.scale.stride(-1) != 1:
            raise ValueError(f"{what}: weight and scale need unit column stride (got {self.weight.stride()}, "
                             f"{self.scale.stride()})")
        if tuple(self.scale.shape) != want:
            raise ValueError(f"{what}: weight {list(self.weight.shape)} in blocks of {list(self.block)} needs "
                             f"a scale of {list(want)}, got {list(self.scale.shape)}")


@dataclass(frozen=True)
class QuantizedRows:
    """act_quant(x, group) of activation rows x, written by the kernel that wrote x (an RMSNorm, the absorbed
    W_UV product): the FP8 GEMM that reads x then loads e4m3 rows instead of quantizing a tile of x at every K
    step (decode rows: 30-40% of its loop on an H200) or launching act_quant. Bit for bit act_quant's values of
    x, so using them or not changes no GEMM result."""
    values: Tensor  # e4m3 [M, K]
    scales: Tensor  # fp32 [M, ceil(K / group)]
    group: int

    def check(self, what: str, rows: int, k: int, group: int) -> None:
        """Shapes, dtypes and group agree with x [rows, k] and the weight's K block. Raises ValueError."""
        want = (rows, math.ceil(k / group))
        if (tuple(self.values.shape) != (rows, k) or tuple(self.scales.shape) != want or self.group != group
                or self.values.dtype != FP8 or self.scales.dtype != torch.float32 or self.values.stride(-1) != 1):
            raise ValueError(f"{what}: quantized rows {list(self.values.shape)} {self.values.dtype}, scales "
                             f"{list(self.scales.shape)} {self.scales.dtype} in groups of {self.group}; x is "
                             f"[{rows}, {k}] and the weight's K block {group} (scales {list(want)} float32)")


def dequantize(weight: Tensor, scale: Tensor, block: tuple[int, int], offset: tuple[int, int] = (0, 0)) -> Tensor:
    """e4m3 [..., N, K] x its block multipliers -> fp32. `offset` (rows, cols) says where the first value
    sits inside its first block, for a slice that starts inside one."""
    n, k = weight.shape[-2:]
    rows = (torch.arange(n, device=weight.device) + offset[0]) // block[0]
    cols = (torch.arange(k, device=weight.device) + offset[1]) // block[1]
    expanded = scale.float().index_select(-2, rows).index_select(-1, cols)
    return weight.float() * expanded


def quantize_weight(w: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """[..., N, K] -> (e4m3 weight, fp32 multiplier per block): each block's amax maps to 448."""
    *lead, n, k = w.shape
    bn, bk = block
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = w.new_zeros(*lead, nb * bn, kb * bk, dtype=torch.float32)
    padded[..., :n, :k] = w
    blocks = padded.view(*lead, nb, bn, kb, bk)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(*lead, nb * bn, kb * bk)
    return q[..., :n, :k].to(FP8), scale


def act_quant(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Per row and per group of `group` channels (the last may be partial): e4m3 values and fp32
    scales [rows, ceil(K / group)] with x ~ q * scale."""
    k = x.shape[-1]
    groups = math.ceil(k / group)
    xf = torch.nn.functional.pad(x.float(), (0, groups * group - k)).view(*x.shape[:-1], groups, group)
    amax = xf.abs().amax(dim=-1).clamp(min=AMAX_FLOOR)
    qmax = torch.full_like(amax, FP8_MAX)  # tensor / tensor: IEEE division (a scalar would become a reciprocal)
    scale = amax / qmax
    q = (xf * (qmax / amax)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # one multiply per value, as the kernels
    return q.view(*x.shape[:-1], groups * group)[..., :k], scale


def act_dequant(q: Tensor, scale: Tensor, group: int) -> Tensor:
    cols = torch.arange(q.shape[-1], device=q.device) // group
    return q.float() * scale.index_select(-1, cols)


def linear(x: Tensor, w: BlockFP8, batch_invariant: bool = False) -> Tensor:
    """The FP8 GEMM's function in fp32: quantized activations times the dequantized weight -> fp32 (batch_invariant:
    each row's product by ops.invariant)."""
    group = w.block[1]
    xq = act_dequant(*act_quant(x, group), group)
    if batch_invariant:
        return invariant.linear(xq, w.dequantize())
    return xq @ w.dequantize().transpose(-1, -2)


__all__ = ["BlockFP8", "FP8", "FP8_MAX", "QuantizedRows", "act_dequant", "act_quant", "dequantize", "linear",
           "quantize_weight"]
