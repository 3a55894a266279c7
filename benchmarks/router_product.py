"""The router's logits (`linear_fp32`: bf16 rows times the bf16 weight [256, 7168] of DeepSeek-V3.2, fp32 out): torch
(both operands converted to fp32, cuBLAS), the per-(expert, row) kernel, and the tensor-core kernel over a sweep of
tiles (rows, columns, K step, warps, stages, K split), each row count timed alone. Each timing is a CUDA graph of
58 calls on distinct weights (213 MB, so L2 holds none of them), median of 15 replays, us per call; the error is
the largest difference from float64 over the largest value. The tile with the best summed ratio to each size's
best, among those within 3e-6, is printed with the table (it is ops/triton/linear.DOT_TILE's candidate).

    python benchmarks/router_product.py [--rows 8 16 17 32 64 256 4096] [--out router.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dsaserve.ops.triton import linear
from dsaserve.ops.triton._common import next_pow2, pdl

N, K, COPIES = 256, 7168, 58
TILES = [(bm, bn, bk, 4, stages, split) for bm, bn, bk, stages, split
         in itertools.product((16, 64), (16, 32), (128, 256), (3, 4), (1, 2, 4, 8))]


def timed(fn, weights: list[torch.Tensor], reps: int = 15) -> float:
    fn(weights[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(weights))
    return sorted(times)[len(times) // 2]


def run(rows: list[int]) -> dict:
    torch.manual_seed(0)
    weights = [torch.randn(N, K, device="cuda").bfloat16() for _ in range(COPIES)]
    times: dict[int, dict[str, float]] = {}
    errors: dict[str, float] = {}
    for T in rows:
        x = torch.randn(T, K, device="cuda").bfloat16()
        want = x.double() @ weights[0].double().T
        out = torch.empty(T, N, device="cuda")
        line = {"torch": timed(lambda w: F.linear(x.float(), w.float()), weights)}
        if T <= linear.FP32_LINEAR_MAX_ROWS:
            line["rows"] = timed(lambda w: linear._linear_rows_kernel[(N, T)](
                x, w, out, x.stride(0), w.stride(0), out.stride(0), K, 1.0, BLOCK_K=next_pow2(K), num_warps=8,
                **pdl(x)), weights)
        for tile in TILES:
            linear.linear_dot(x, weights[0], out, 1.0, tile)
            errors[str(tile)] = max(errors.get(str(tile), 0.0), ((out.double() - want).abs().max() /
                                                                 want.abs().max()).item())
            line[str(tile)] = timed(lambda w, tile=tile: linear.linear_dot(x, w, out, 1.0, tile), weights)
        times[T] = line
        print(f"rows {T}: torch {line['torch']:.2f} us, best tile {min(line[str(t)] for t in TILES):.2f}", flush=True)
    return {"rows": rows, "us": times, "errors": errors}


def pick(result: dict) -> str:
    big = [T for T in result["rows"] if T >= linear.DOT_MIN_ROWS]
    best = {T: min(result["us"][T][str(t)] for t in TILES) for T in big}
    score = {str(t): sum(result["us"][T][str(t)] / best[T] for T in big) for t in TILES}
    accurate = [str(t) for t in TILES if result["errors"][str(t)] < 3e-6] or [str(t) for t in TILES]
    return min(accurate, key=score.get)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 17, 32, 64, 256, 4096])
    ap.add_argument("--out", default=None, help="write the timings and errors as JSON")
    a = ap.parse_args()
    result = run(a.rows)
    chosen, now = pick(result), str(linear.DOT_TILE)
    print(f"\n{torch.cuda.get_device_name()}: us per call (graph of {COPIES} calls on distinct weights)")
    print(f"{'rows':>6} {'torch':>8} {'row kernel':>11} {'DOT_TILE':>9} {'picked':>8} {'best':>8}  best tile")
    for T in a.rows:
        line = result["us"][T]
        best = min(TILES, key=lambda t: line[str(t)])
        rows_us = f"{line['rows']:.2f}" if "rows" in line else "-"
        print(f"{T:>6} {line['torch']:>8.2f} {rows_us:>11} {line[now]:>9.2f} {line[chosen]:>8.2f} "
              f"{line[str(best)]:>8.2f}  {best}")
    print(f"DOT_TILE {now}: error {result['errors'][now]:.1e}; picked {chosen}: error {result['errors'][chosen]:.1e}")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), **result, "picked": chosen},
                                          indent=1))


if __name__ == "__main__":
    main()
