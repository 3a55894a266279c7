"""Sparse MLA at the head counts of a `--tp 4 / 8` rank (8, 16, 32 heads): Triton's narrow programs (`gluon` 0)
against the Gluon kernel with the heads past H masked in its 64-row tiles (`gluon` 2), at decode- and
prefill-shaped row counts, over FP8 and bf16 caches; what `mla._gluon`'s rule was drawn from.

    python benchmarks/mla_narrow.py [--heads 8 16 32] [--rows 1 4 16 64 256 1024 4096] [--output-json out.json]

One cache of C slots (a prompt's context: 1,040 and 4,096, and 32,768 at 4,096 rows), each row 2,048 random
distinct slots of it (all of them where C < 2,048). CUDA-graph replay with L2 flushed, best of two runs per kernel
(benchmarks/kernels.py `bench`); every output checked against the reference on its first rows. Prints us per
call, Gluon's time over Triton's and the useful TFLOP/s of each (matrix FLOPs of the H real heads).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("dsaserve") is None:  # PYTHONPATH's dsaserve wins (an A/B against a base package)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import bench, rel  # noqa: E402
from dsaserve.cache import kv_format  # noqa: E402
from dsaserve.ops import reference as ref  # noqa: E402
from dsaserve.ops.triton import mla  # noqa: E402

D, V, K = 576, 512, 2048
SCALE = D ** -0.5
BF16_MIN_ROWS = 64  # a bf16 cache only at prefill-sized rows (over it the narrow heads tie)


def caches(contexts: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for c in contexts:
        rows = torch.randn(c, D, device="cuda").to(torch.bfloat16)
        fp8 = kv_format.quantize_fp8(rows[:, :V], rows[:, V:])
        out[c] = {"fp8": fp8, "bf16": kv_format.dequantize_fp8(fp8, V, D - V).to(torch.bfloat16)}
    return out


def run_case(cache: torch.Tensor, dtype: str, heads: int, rows: int, context: int) -> dict:
    keys = min(K, context)
    q = torch.randn(rows, heads, D, device="cuda").to(torch.bfloat16)
    idx = torch.rand(rows, context, device="cuda").topk(keys, dim=1).indices.to(torch.int32)
    n = min(rows, 8)
    want, _ = ref.sparse_mla(q[:n], cache if dtype == "fp8" else cache.float(), idx[:n], SCALE, V)
    times, errors = {}, {}
    for gluon in (0, 2, 0, 2):
        mla.CONFIG = {"gluon": gluon}
        errors[gluon] = rel(mla.sparse_mla(q[:n], cache, idx[:n], SCALE, V)[0], want)
        assert errors[gluon] < 2e-2, f"gluon {gluon}: {errors[gluon]:.1e} off the reference"
        t = bench(lambda: mla.sparse_mla(q, cache, idx, SCALE, V), graph=True) * 1e3
        times[gluon] = min(times.get(gluon, float("inf")), t)
    mla.CONFIG = None
    flop = mla.flops(rows, heads, keys, D, V)
    return {"cache": dtype, "heads": heads, "rows": rows, "context": context, "triton_us": times[0],
            "gluon_us": times[2], "gluon_over_triton": times[2] / times[0], "triton_tflops": flop / times[0] / 1e6,
            "gluon_tflops": flop / times[2] / 1e6, "err_triton": errors[0], "err_gluon": errors[2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    ap.add_argument("--output-json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    pool = caches([1040, 4096, 32768])
    print(f"{torch.cuda.get_device_name()}; us per call (CUDA graph, L2 flushed)")
    print(f"{'cache':>5} {'heads':>5} {'rows':>5} {'context':>7} {'triton us':>10} {'gluon us':>9} {'g / t':>6} "
          f"{'triton TF/s':>11} {'gluon TF/s':>10}")
    results = []
    for dtype in ("fp8", "bf16"):
        for heads in a.heads:
            for rows in a.rows:
                if dtype == "bf16" and rows < BF16_MIN_ROWS:
                    continue
                contexts = [1040, 4096] if rows <= 64 else [4096, 32768] if rows >= 4096 else [4096]
                for context in contexts:
                    r = run_case(pool[context][dtype], dtype, heads, rows, context)
                    results.append(r)
                    print(f"{dtype:>5} {heads:5d} {rows:5d} {context:7d} {r['triton_us']:10.1f} {r['gluon_us']:9.1f} "
                          f"{r['gluon_over_triton']:6.3f} {r['triton_tflops']:11.1f} {r['gluon_tflops']:10.1f}",
                          flush=True)
    if a.output_json:
        Path(a.output_json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
