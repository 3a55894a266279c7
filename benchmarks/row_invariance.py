"""Does a row's result follow the row count? For DeepSeek-V3.2's projection shapes: row 0 of a product over M rows
against its M = 1 value, and the last row against that row alone, for the FP8 GEMM with its default tiers (split-K
at decode rows, cuBLAS from 96 rows), the FP8 GEMM with one fixed config (what a GPU deterministic mode would take),
and bf16 `F.linear` (cuBLAS; on CPU: BLAS). Prints a table and writes JSON:

    python benchmarks/row_invariance.py [--json /tmp/row_invariance.json]
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

ROWS = (1, 2, 3, 8, 16, 17, 32, 48, 64, 65, 80, 96, 128, 256, 1024)
SHAPES = {"q_a+wk+kv_a": (2240, 7168), "o_proj/8": (7168, 2048), "q_b": (24576, 1536)}
# One tile config for every row count: no split-K, no GEMV, cuBLAS or wgmma path (fp8_gemm.default_config's keys).
FIXED = dict(block_m=64, block_n=128, num_warps=4, num_stages=4, group_m=8, a_quant=0, splits=1, cublas=0, wgmma=0,
             gemv=0)


def differing_rows(product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[list[int], list[int]]:
    """(row counts M at which row 0 differs from its M = 1 value, those at which row M - 1 differs from itself
    alone)."""
    first = product(x[:1])
    head = [m for m in ROWS if not torch.equal(product(x[:m])[:1], first)]
    tail = [m for m in ROWS if not torch.equal(product(x[:m])[m - 1:m], product(x[m - 1:m]))]
    return head, tail


def products(n: int, k: int, device: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    gen = torch.Generator(device).manual_seed(n + k)
    weight = torch.randn(n, k, device=device, generator=gen) * 0.02
    paths: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if device == "cuda":
        from dsaserve.ops.fp8 import BlockFP8, quantize_weight
        from dsaserve.ops.triton.fp8_gemm import fp8_linear
        w8 = BlockFP8(*quantize_weight(weight, (128, 128)), (128, 128))
        paths["fp8 default"] = lambda a: fp8_linear(a, w8)
        paths["fp8 fixed"] = lambda a: fp8_linear(a, w8, config=FIXED)
    wb = weight.to(torch.bfloat16)
    paths["bf16 F.linear"] = lambda a: F.linear(a, wb)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    print(f"{'weight':>12} {'N x K':>12} {'path':>14}  row 0 differs at M / last row differs at M")
    for name, (n, k) in SHAPES.items():
        x = torch.randn(max(ROWS), k, device=device, generator=torch.Generator(device).manual_seed(k)).bfloat16()
        for path, product in products(n, k, device).items():
            head, tail = differing_rows(product, x)
            results.append(dict(weight=name, n=n, k=k, path=path, row0_differs_at=head, last_row_differs_at=tail))
            print(f"{name:>12} {f'{n}x{k}':>12} {path:>14}  {head or 'never'} / {tail or 'never'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", rows=ROWS,
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
