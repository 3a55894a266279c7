"""Shared helpers for the Triton kernels: output allocation (with a poison hook for tests) and device facts."""
from __future__ import annotations

import functools

import torch

# Tests set this to True so every output and intermediate starts as NaN (floats) or a sentinel (ints):
# any element a kernel forgets to write then shows up in the comparison with the reference.
POISON = False
INT_POISON = -123457


def new_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if dtype.is_floating_point else INT_POISON)
    return out


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    return num_sms(t.device.index or 0) if t.is_cuda else 8  # CPU: the Triton interpreter (debugging)


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact IEEE products (Hopper would silently use TF32); bf16/fp16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
