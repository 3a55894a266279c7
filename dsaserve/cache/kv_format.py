"""Cache row formats: plain rows in a float dtype, or FP8 e4m3 with fp32 block scales (FlashMLA's layout).

An FP8 row holds n quantized values and r unquantized rope values (r = 0 for index keys), as uint8 bytes:

    [0, n)                 n e4m3 values, x / scale of their block of 128
    [n, n + 4b)            b = ceil(n / 128) fp32 scales, multipliers: x ~= e4m3 * scale
    [n + 4b, n + 4b + 2r)  r bf16 values (rope'd k_pe), not quantized
    then zero bytes up to a multiple of 16 (rows stay 16-byte aligned for the kernels' vector loads)

The MLA latent (n = 512, r = 64) is FlashMLA's 656-byte row; an index key (n = 128) holds 132 bytes of
data in a 144-byte row (a 132-byte stride gave misaligned loads in the indexer kernel on an H200).
A scale is the power of two 2^ceil(log2(amax / 448)) of its block: dividing by it is exact, so e4m3
rounding is the only error, and the dequantized values are exact in bf16 as well as in fp32.

FP8 index keys are stored rotated by the normalized Hadamard matrix H, and the indexer's queries are rotated by
the same H before they meet them (model.indexer.Indexer, ops.fused.rope_hadamard_), as the official indexer does
(its rotate_activation before FP8 quantization): H is orthogonal, so q H . k H = q . k, while an outlier channel
is spread over the block before e4m3 rounding. Plain (bf16 / fp32) index keys are not rotated: there it would
change nothing.

A uint8 cache tensor means the FP8 format; any float dtype means plain rows of n + r values.
"""
from __future__ import annotations

import torch

from dsaserve.ops.fp8 import FP8, FP8_MAX  # FP8 also names this cache format (its storage is uint8)

Tensor = torch.Tensor
BLOCK = 128
ROW_ALIGN = 16  # bytes


def num_blocks(n: int) -> int:
    return -(-n // BLOCK)


def row_bytes(n: int, rope: int, dtype: torch.dtype) -> int:
    """Bytes of one cache row of n (+ rope) values stored as `dtype` (FP8: this module's layout)."""
    if dtype == FP8:
        return -(-(n + 4 * num_blocks(n) + 2 * rope) // ROW_ALIGN) * ROW_ALIGN
    return (n + rope) * torch.empty((), dtype=dtype).element_size()


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.uint8 if dtype == FP8 else dtype


def check_fp8_dims(n: int, rope: int) -> None:
    """The scales and rope values must be aligned for the typed views the readers take."""
    if n % 4 or rope % 2:
        raise ValueError(f"FP8 cache rows need n % 4 == 0 and an even rope width, got n={n}, rope={rope}")


def fp8_scales(x: Tensor) -> Tensor:
    """Per-block power-of-two scales [..., b] fp32 of x [..., n]."""
    n = x.shape[-1]
    b = num_blocks(n)
    padded = torch.nn.functional.pad(x.float().abs(), (0, b * BLOCK - n)) if n % BLOCK else x.float().abs()
    ratio = (padded.unflatten(-1, (b, -1)).amax(-1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1): exact ceil(log2)
    return torch.exp2((exponent - (mantissa == 0.5).to(exponent.dtype)).float())


def quantize_fp8(x: Tensor, rope: Tensor | None = None) -> Tensor:
    """x [T, n] (and rope [T, r]) -> uint8 rows [T, row_bytes(n, r, FP8)]."""
    T, n = x.shape
    scales = fp8_scales(x)  # [T, b]
    expanded = scales.repeat_interleave(BLOCK, dim=-1)[:, :n]
    parts = [(x.float() / expanded).to(FP8).view(torch.uint8), scales.contiguous().view(torch.uint8)]
    if rope is not None:
        parts.append(rope.to(torch.bfloat16).contiguous().view(torch.uint8))
    pad = row_bytes(n, 0 if rope is None else rope.shape[-1], FP8) - sum(p.shape[-1] for p in parts)
    parts.append(torch.zeros(T, pad, dtype=torch.uint8, device=x.device))
    return torch.cat(parts, dim=-1)


def fp8_views(rows: Tensor, n: int, rope: int) -> tuple[Tensor, Tensor, Tensor]:
    """Typed views of uint8 rows [..., bytes]: values e4m3 [..., n], scales fp32 [..., b], rope bf16 [..., rope]
    (the rest of a row is padding)."""
    b = num_blocks(n)
    values = rows[..., :n].view(FP8)
    scales = rows[..., n:n + 4 * b].view(torch.float32)
    return values, scales, rows[..., n + 4 * b:n + 4 * b + 2 * rope].view(torch.bfloat16)


def row_views(rows: Tensor, n: int, rope: int) -> tuple[Tensor, Tensor, Tensor]:
    """(values [..., n], scales, rope values [..., rope]) of latent cache rows: an FP8 row's typed views
    (fp8_views), or bf16 / fp32 rows themselves (no scales: the rows stand in) and their rope slice."""
    if rows.dtype == torch.uint8:
        return fp8_views(rows, n, rope)
    return rows, rows, rows[..., n:n + rope]


def dequantize_fp8(rows: Tensor, n: int, rope: int) -> Tensor:
    """uint8 rows [..., bytes] -> fp32 [..., n + rope] (exact: e4m3 times a power of two, bf16 rope)."""
    values, scales, rope_values = fp8_views(rows, n, rope)
    x = values.float() * scales.repeat_interleave(BLOCK, dim=-1)[..., :n]
    return torch.cat([x, rope_values.float()], dim=-1)


def read_rows(cache: Tensor, index: Tensor, n: int, rope: int) -> Tensor:
    """cache[index] in fp32: gathered first, so only the selected FP8 rows are dequantized."""
    rows = cache[index]
    return dequantize_fp8(rows, n, rope) if cache.dtype == torch.uint8 else rows.float()


def check_cache(name: str, cache: Tensor, n: int, rope: int) -> str | None:
    """A message naming what is wrong when `cache` cannot hold rows of n (+ rope) values, else None."""
    if cache.dim() != 2:
        return f"{name} must be [slots, row], got shape {tuple(cache.shape)}"
    if cache.dtype == torch.uint8:
        want = row_bytes(n, rope, FP8)
        if cache.shape[1] != want:
            return f"{name} is FP8 (uint8) with {cache.shape[1]} bytes per row, expected {want} for n={n}, rope={rope}"
        return None
    if not cache.dtype.is_floating_point:
        return f"{name} has dtype {cache.dtype}: expected a float dtype or uint8 (FP8 layout)"
    if cache.shape[1] != n + rope:
        return f"{name} rows have {cache.shape[1]} values, expected {n + rope}"
    return None
